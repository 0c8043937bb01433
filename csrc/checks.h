// The invariants every compiled entry point of the ops checks before it touches memory, shared by the
// CPU (cpu/) and CUDA (cuda/ops_cuda.cpp) implementations: the only argument checks in csrc/. The
// public Python ops check the same things first, with friendlier messages (aclip_kernels/ops/_checks.py);
// these checks are for whoever calls torch.ops.aclip_kernels.* directly: no argument may make a
// kernel read or write out of bounds. Shape errors raise ValueError, dtype errors TypeError
// (TORCH_CHECK_VALUE / _TYPE).
#pragma once

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/util/Exception.h>

#include <cmath>
#include <cstdint>
#include <optional>

namespace aclip {

// Sides of a grid (and their product) stay below 2**31 so that kernels may index cells in int32;
// so do the bytes of one token row (D * itemsize), which the CUDA kernels copy with int32 indices.
constexpr int64_t kMaxSide = INT32_MAX;

inline void check_row_bytes(const char* op, const char* name, const at::Tensor& t) {
  const int64_t bytes = t.size(-1) * static_cast<int64_t>(t.element_size());
  TORCH_CHECK_VALUE(bytes <= kMaxSide, op, ": the rows of ", name, " ", t.sizes(), " have ", bytes,
                    " bytes; at most 2**31 - 1");
}

// Whether every value of the 2-D floating tensor t is finite. On the CPU a loop over its values (no
// ATen op: three of them cost ~150 us with cold caches, against ~1 us for the loop); on a GPU one
// reduction and a sync.
inline bool all_finite(const at::Tensor& t) {
  if (!t.is_cpu() || t.dim() != 2) return at::isfinite(t).all().item<bool>();
  bool finite = true;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, t.scalar_type(), "all_finite", [&] {
    const scalar_t* data = t.const_data_ptr<scalar_t>();
    for (int64_t i = 0; i < t.size(0); ++i)
      for (int64_t j = 0; j < t.size(1); ++j)
        finite = finite && std::isfinite(static_cast<double>(data[i * t.stride(0) + j * t.stride(1)]));
  });
  return finite;
}

inline void check_floating(const char* op, const char* name, const at::Tensor& t) {
  TORCH_CHECK_TYPE(t.scalar_type() == at::kFloat || t.scalar_type() == at::kHalf ||
                       t.scalar_type() == at::kBFloat16 || t.scalar_type() == at::kDouble,
                   op, ": ", name, " must be float32, float16, bfloat16 or float64; got ", t.scalar_type());
}

inline void check_same_device(const char* op, const char* name, const at::Tensor& t, const at::Tensor& ref) {
  TORCH_CHECK_VALUE(t.device() == ref.device(), op, ": ", name, " is on ", t.device(), " but the first tensor is on ",
                    ref.device(), "; all tensors must be on one device");
}

// A tensor on the device type a kernel runs on (the dispatcher picks the implementation from all tensors).
inline void check_device_type(const char* op, const char* name, const at::Tensor& t, c10::DeviceType type) {
  TORCH_CHECK(t.device().type() == type, op, ": ", name, " is on ", t.device(), "; this kernel needs ",
              c10::DeviceTypeName(type), " tensors");
}

struct ClsAttentionShape {
  int64_t B, H, T, Dh, P, N;
};

// q [B, H, Dh] and k [B, H, P+N, Dh] of one dtype, H, Dh, N >= 1; prior [B, N] floating.
inline ClsAttentionShape check_cls_attention(const at::Tensor& q, const at::Tensor& k, int64_t num_prefix_tokens,
                                             const std::optional<at::Tensor>& prior) {
  constexpr const char* op = "cls_attention";
  TORCH_CHECK_VALUE(q.dim() == 3 && k.dim() == 4, op, ": q must be [B, H, Dh] and k [B, H, T, Dh]; got ", q.sizes(),
                    " and ", k.sizes());
  check_floating(op, "q", q);
  TORCH_CHECK_TYPE(k.scalar_type() == q.scalar_type(), op, ": q is ", q.scalar_type(), " but k is ", k.scalar_type(),
                   "; q and k must have one dtype");
  check_same_device(op, "k", k, q);
  const ClsAttentionShape s{q.size(0), q.size(1), k.size(2), q.size(2), num_prefix_tokens,
                            k.size(2) - num_prefix_tokens};
  TORCH_CHECK_VALUE(k.size(0) == s.B && k.size(1) == s.H && k.size(3) == s.Dh && s.H >= 1 && s.Dh >= 1, op, ": k ",
                    k.sizes(), " must match q ", q.sizes(), " in batch, heads (>= 1) and head dim (>= 1)");
  TORCH_CHECK_VALUE(s.P >= 0 && s.N >= 1 && s.T <= kMaxSide, op, ": num_prefix_tokens=", s.P,
                    " must be in [0, T) for k ", k.sizes());
  TORCH_CHECK_VALUE(s.B <= kMaxSide && s.H <= kMaxSide && s.Dh <= kMaxSide, op, ": shapes too large: k ", k.sizes());
  if (prior.has_value()) {
    check_floating(op, "prior", *prior);
    check_same_device(op, "prior", *prior, q);
    TORCH_CHECK_VALUE(prior->sizes() == at::IntArrayRef({s.B, s.N}), op, ": prior must be [B, N] = [", s.B, ", ",
                      s.N, "]; got ", prior->sizes());
  }
  return s;
}

struct MaskShape {
  int64_t Bx, P, D, Hs, Ws, Hg, Wg, block, Hu, Wu, N, U, num_units, M, Bs;
};

// The full contract of the attentive_mask op schema (aclip_kernels/ops/attentive_mask.py):
// x [Bx, P + Hg*Wg, D]; either scores [Bs, Hs*Ws] or q [Bs, H, Dh] + k [Bs, H, P + Hs*Ws, Dh]
// (+ prior [Bs, Hs*Ws]); Bx a multiple of Bs >= 1; grids of positive sides; block dividing the grid;
// 1 <= num_units <= units; boxes [Bx, 4] of finite numbers (a value check: it synchronises with a
// CUDA device).
inline MaskShape check_attentive_mask(const at::Tensor& x, const std::optional<at::Tensor>& scores,
                                      const std::optional<at::Tensor>& q, const std::optional<at::Tensor>& k,
                                      const std::optional<at::Tensor>& prior, const std::optional<at::Tensor>& boxes,
                                      int64_t num_prefix_tokens, at::IntArrayRef score_grid, at::IntArrayRef grid,
                                      int64_t block, int64_t num_units) {
  constexpr const char* op = "attentive_mask";
  TORCH_CHECK_VALUE(x.dim() == 3, op, ": x must be [Bx, P+N, D]; got ", x.sizes());
  TORCH_CHECK_VALUE(score_grid.size() == 2 && grid.size() == 2, op, ": score_grid and grid must be (H, W); got ",
                    score_grid, " and ", grid);
  MaskShape s{};
  s.Bx = x.size(0);
  s.P = num_prefix_tokens;
  s.D = x.size(2);
  check_row_bytes(op, "x", x);
  s.Hs = score_grid[0];
  s.Ws = score_grid[1];
  s.Hg = grid[0];
  s.Wg = grid[1];
  s.block = block;
  for (const int64_t side : {s.Hs, s.Ws, s.Hg, s.Wg})
    TORCH_CHECK_VALUE(side >= 1 && side <= kMaxSide, op, ": grid sides must be positive; got score_grid ", score_grid,
                      " and grid ", grid);
  TORCH_CHECK_VALUE(s.Hs * s.Ws <= kMaxSide && s.Hg * s.Wg <= kMaxSide, op, ": grids too large: score_grid ",
                    score_grid, ", grid ", grid);
  TORCH_CHECK_VALUE(block >= 1 && s.Hg % block == 0 && s.Wg % block == 0, op, ": block=", block,
                    " must be positive and divide the grid ", grid);
  s.Hu = s.Hg / block;
  s.Wu = s.Wg / block;
  s.N = s.Hg * s.Wg;
  s.U = s.Hu * s.Wu;
  TORCH_CHECK_VALUE(s.P >= 0 && x.size(1) == s.P + s.N, op, ": x ", x.sizes(), " must have P + Hg*Wg = ", s.P, " + ",
                    s.N, " tokens (grid ", grid, ")");
  TORCH_CHECK_VALUE(num_units >= 1 && num_units <= s.U, op, ": num_units=", num_units, " must be in [1, ", s.U,
                    "] (grid ", grid, ", block ", block, ")");
  s.num_units = num_units;
  s.M = num_units * block * block;

  TORCH_CHECK_VALUE(scores.has_value() != (q.has_value() || k.has_value()), op,
                    ": give either scores, or q and k, not both or neither");
  TORCH_CHECK_VALUE(!(scores.has_value() && prior.has_value()), op, ": prior goes with q and k, not with scores");
  if (scores.has_value()) {
    check_floating(op, "scores", *scores);
    check_same_device(op, "scores", *scores, x);
    TORCH_CHECK_VALUE(scores->dim() == 2 && scores->size(1) == s.Hs * s.Ws, op, ": scores must be [Bs, Hs*Ws] = [Bs, ",
                      s.Hs * s.Ws, "] for score_grid ", score_grid, "; got ", scores->sizes());
    s.Bs = scores->size(0);
  } else {
    TORCH_CHECK_VALUE(q.has_value() && k.has_value(), op, ": the fused scores need both q and k");
    check_same_device(op, "q", *q, x);
    const ClsAttentionShape c = check_cls_attention(*q, *k, s.P, prior);
    TORCH_CHECK_VALUE(c.N == s.Hs * s.Ws, op, ": k ", k->sizes(), " must have P + Hs*Ws = ", s.P, " + ", s.Hs * s.Ws,
                      " tokens (score_grid ", score_grid, ")");
    s.Bs = c.B;
  }
  TORCH_CHECK_VALUE(s.Bs >= 1 && s.Bx % s.Bs == 0, op, ": x has ", s.Bx, " rows, which is not a multiple of the ", s.Bs,
                    " rows of the scores");
  if (boxes.has_value()) {
    check_floating(op, "boxes", *boxes);
    check_same_device(op, "boxes", *boxes, x);
    TORCH_CHECK_VALUE(boxes->sizes() == at::IntArrayRef({s.Bx, 4}), op, ": boxes must be [Bx, 4] = [", s.Bx,
                      ", 4]; got ", boxes->sizes());
    TORCH_CHECK_VALUE(all_finite(*boxes), op, ": boxes must be finite; got ",
                      boxes->isfinite().logical_not().sum().item<int64_t>(), " non-finite values");
  }
  return s;
}

// Whether every row of the 2-D int64 tensor idx ascends strictly inside [0, limit): on the CPU a loop
// over its values, on a GPU a few reductions and a sync.
inline bool rows_ascend_within(const at::Tensor& idx, int64_t limit) {
  if (!idx.is_cpu()) {
    at::Tensor bad = (idx < 0).logical_or_(idx >= limit).any();
    if (idx.size(1) > 1) bad.logical_or_((idx.narrow(1, 1, idx.size(1) - 1) <= idx.narrow(1, 0, idx.size(1) - 1)).any());
    return !bad.item<bool>();
  }
  const int64_t* data = idx.const_data_ptr<int64_t>();
  const int64_t s0 = idx.stride(0), s1 = idx.stride(1);
  for (int64_t i = 0; i < idx.size(0); ++i) {
    int64_t previous = -1;
    for (int64_t j = 0; j < idx.size(1); ++j) {
      const int64_t v = data[i * s0 + j * s1];
      if (v <= previous || v >= limit) return false;
      previous = v;
    }
  }
  return true;
}

// grad_kept [Bx, P+M, D] and idx [Bx, M] int64 whose rows ascend strictly inside [0, num_patches): the
// indices the forward returned. The value check synchronises with a CUDA device.
inline void check_attentive_mask_backward(const at::Tensor& grad_kept, const at::Tensor& idx,
                                          int64_t num_prefix_tokens, int64_t num_patches) {
  constexpr const char* op = "attentive_mask_backward";
  check_floating(op, "grad_kept", grad_kept);
  TORCH_CHECK_TYPE(idx.scalar_type() == at::kLong, op, ": idx must be int64; got ", idx.scalar_type());
  check_same_device(op, "idx", idx, grad_kept);
  TORCH_CHECK_VALUE(grad_kept.dim() == 3 && idx.dim() == 2 && idx.size(0) == grad_kept.size(0) &&
                        num_prefix_tokens >= 0 && grad_kept.size(1) == num_prefix_tokens + idx.size(1),
                    op, ": grad_kept ", grad_kept.sizes(), " must be [Bx, P+M, D] for idx ", idx.sizes(),
                    " [Bx, M] and P=", num_prefix_tokens);
  check_row_bytes(op, "grad_kept", grad_kept);
  TORCH_CHECK_VALUE(num_patches >= idx.size(1) && num_patches <= kMaxSide, op, ": num_patches=", num_patches,
                    " must be in [M, 2**31) for idx ", idx.sizes());
  if (idx.numel() == 0) return;
  TORCH_CHECK_VALUE(rows_ascend_within(idx, num_patches), op, ": every row of idx must ascend strictly inside [0, num_patches=",
                    num_patches, "), as the forward returns it");
}

}  // namespace aclip

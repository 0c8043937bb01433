// The CUDA implementations of the aclip_kernels ops: argument checks (host-side, so that bad input
// raises instead of tripping a device-side assert), allocation, device guard and current stream,
// then the launchers of cls_attention.cu and attentive_mask.cu.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "launch.h"

namespace aclip::cuda {
namespace {

void check_on(const char* op, const char* name, const at::Tensor& t, const char* ref_name, const at::Tensor& ref) {
  TORCH_CHECK(t.device() == ref.device(), op, ": ", name, " is on ", t.device(), " but ", ref_name, " is on ",
              ref.device(), "; all tensors must be on one CUDA device");
}

DType dtype_of(const char* op, const at::Tensor& t, const char* name) {
  switch (t.scalar_type()) {
    case at::kFloat: return DType::kFloat;
    case at::kHalf: return DType::kHalf;
    case at::kBFloat16: return DType::kBFloat16;
    case at::kDouble: return DType::kDouble;
    default: TORCH_CHECK(false, op, ": ", name, " must be float32, float16, bfloat16 or float64; got ", t.scalar_type());
  }
}

template <size_t R>
void copy_strides(int64_t (&dst)[R], const at::Tensor& t) {
  for (size_t i = 0; i < R; ++i) dst[i] = t.stride(static_cast<int64_t>(i));
}

at::Tensor cls_attention(const at::Tensor& q, const at::Tensor& k, int64_t num_prefix_tokens, double scale,
                         const std::optional<at::Tensor>& prior) {
  TORCH_CHECK(q.dim() == 3 && k.dim() == 4, "cls_attention: q [B, H, Dh] and k [B, H, T, Dh]; got ", q.sizes(),
              " and ", k.sizes());
  TORCH_CHECK(q.is_cuda(), "cls_attention: q is on ", q.device(), "; the CUDA kernel needs CUDA tensors");
  check_on("cls_attention", "k", k, "q", q);
  const int64_t B = q.size(0), H = q.size(1), Dh = q.size(2), T = k.size(2);
  const int64_t P = num_prefix_tokens, N = T - P;
  TORCH_CHECK(k.size(0) == B && k.size(1) == H && k.size(3) == Dh && P >= 0 && N > 0,
              "cls_attention: k ", k.sizes(), " does not match q ", q.sizes(), " with P=", P);
  TORCH_CHECK(k.scalar_type() == q.scalar_type(), "cls_attention: q is ", q.scalar_type(), " but k is ",
              k.scalar_type());
  const DType dtype = dtype_of("cls_attention", q, "q");
  TORCH_CHECK(T <= INT32_MAX && Dh <= INT32_MAX && H <= INT32_MAX && B <= INT32_MAX,
              "cls_attention: shapes too large: k ", k.sizes());
  const c10::cuda::CUDAGuard guard(q.device());
  const auto out_dtype = q.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor base;
  if (prior.has_value()) {
    check_on("cls_attention", "prior", *prior, "q", q);
    TORCH_CHECK(prior->sizes() == at::IntArrayRef({B, N}) && prior->is_floating_point(),
                "cls_attention: prior must be a floating-point [B, N] = [", B, ", ", N, "]; got ", prior->sizes(),
                " ", prior->scalar_type());
    base = prior->to(out_dtype).contiguous();
  }
  at::Tensor out = at::empty({B, N}, q.options().dtype(out_dtype));
  ClsAttentionArgs a{q.const_data_ptr(), k.const_data_ptr(), base.defined() ? base.const_data_ptr() : nullptr,
                     out.mutable_data_ptr(), dtype, B, H, T, Dh, P, {}, {}, scale};
  copy_strides(a.qs, q);
  copy_strides(a.ks, k);
  launch_cls_attention(a, c10::cuda::getCurrentCUDAStream());
  return out;
}

std::tuple<at::Tensor, at::Tensor> attentive_mask(
    const at::Tensor& x, const std::optional<at::Tensor>& scores, const std::optional<at::Tensor>& q,
    const std::optional<at::Tensor>& k, const std::optional<at::Tensor>& prior,
    const std::optional<at::Tensor>& boxes, int64_t num_prefix_tokens, at::IntArrayRef score_grid,
    at::IntArrayRef grid, int64_t block, int64_t num_units, double scale) {
  TORCH_CHECK(x.dim() == 3, "attentive_mask: x must be [Bx, P+N, D]; got ", x.sizes());
  TORCH_CHECK(x.is_cuda(), "attentive_mask: x is on ", x.device(), "; the CUDA kernel needs CUDA tensors");
  TORCH_CHECK(score_grid.size() == 2 && grid.size() == 2, "attentive_mask: score_grid and grid must be (H, W); got ",
              score_grid, " and ", grid);
  const int64_t P = num_prefix_tokens, Bx = x.size(0), D = x.size(2);
  const int64_t Hs = score_grid[0], Ws = score_grid[1], Hg = grid[0], Wg = grid[1];
  TORCH_CHECK(Hs > 0 && Ws > 0 && Hg > 0 && Wg > 0 && Hs * Ws <= INT32_MAX && Hg * Wg <= INT32_MAX,
              "attentive_mask: bad grids: score_grid ", score_grid, ", grid ", grid);
  TORCH_CHECK(block > 0 && Hg % block == 0 && Wg % block == 0, "attentive_mask: block ", block,
              " must divide the grid ", grid);
  const int64_t N = Hg * Wg, U = (Hg / block) * (Wg / block);
  TORCH_CHECK(P >= 0 && x.size(1) == P + N, "attentive_mask: x ", x.sizes(), " must have P + Hg*Wg = ", P, " + ", N,
              " tokens (grid ", grid, ")");
  TORCH_CHECK(num_units > 0 && num_units <= U, "attentive_mask: num_units ", num_units, " must be in [1, ", U,
              "] (grid ", grid, ", block ", block, ")");
  TORCH_CHECK(scores.has_value() ? !q.has_value() && !k.has_value() : q.has_value() && k.has_value(),
              "attentive_mask: give either scores, or q and k");
  TORCH_CHECK(!(scores.has_value() && prior.has_value()), "attentive_mask: prior goes with q and k, not scores");

  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor map;
  if (scores.has_value()) {
    check_on("attentive_mask", "scores", *scores, "x", x);
    TORCH_CHECK(scores->is_floating_point(), "attentive_mask: scores must be floating point; got ",
                scores->scalar_type());
    map = scores->to(at::kFloat).contiguous();
  } else {
    check_on("attentive_mask", "q", *q, "x", x);
    check_on("attentive_mask", "k", *k, "x", x);
    if (prior.has_value()) check_on("attentive_mask", "prior", *prior, "x", x);
    map = cls_attention(*q, *k, P, scale, prior).to(at::kFloat);
  }
  const int64_t Bs = map.dim() == 2 ? map.size(0) : 0;
  TORCH_CHECK(map.dim() == 2 && map.size(1) == Hs * Ws && Bs > 0 && Bx % Bs == 0, "attentive_mask: scores ",
              map.sizes(), " do not match score grid ", score_grid, " and x ", x.sizes());
  at::Tensor box;
  if (boxes.has_value()) {
    check_on("attentive_mask", "boxes", *boxes, "x", x);
    TORCH_CHECK(boxes->sizes() == at::IntArrayRef({Bx, 4}) && boxes->is_floating_point(),
                "attentive_mask: boxes must be a floating-point [Bx, 4] = [", Bx, ", 4]; got ", boxes->sizes());
    box = boxes->to(at::kFloat).contiguous();
  }

  const int64_t M = num_units * block * block;
  at::Tensor kept = at::empty({Bx, P + M, D}, x.options());
  at::Tensor idx = at::empty({Bx, M}, x.options().dtype(at::kLong));
  MaskArgs a{};
  a.x = static_cast<const char*>(x.const_data_ptr());
  a.kept = static_cast<char*>(kept.mutable_data_ptr());
  a.idx = idx.mutable_data_ptr<int64_t>();
  a.map = map.const_data_ptr<float>();
  a.boxes = box.defined() ? box.const_data_ptr<float>() : nullptr;
  a.Bx = Bx;
  a.Bs = Bs;
  a.P = P;
  a.D = D;
  a.elsize = x.element_size();
  copy_strides(a.xs, x);
  a.Hs = static_cast<int>(Hs);
  a.Ws = static_cast<int>(Ws);
  a.Hg = static_cast<int>(Hg);
  a.Wg = static_cast<int>(Wg);
  a.block = static_cast<int>(block);
  a.num_units = static_cast<int>(num_units);
  a.resample = box.defined() || Hs != Hg || Ws != Wg;
  launch_attentive_mask(a, c10::cuda::getCurrentCUDAStream());
  return {kept, idx};
}

at::Tensor attentive_mask_backward(const at::Tensor& grad_kept, const at::Tensor& idx_in, int64_t num_prefix_tokens,
                                   int64_t num_patches) {
  TORCH_CHECK(grad_kept.is_cuda(), "attentive_mask_backward: grad_kept is on ", grad_kept.device(),
              "; the CUDA kernel needs CUDA tensors");
  check_on("attentive_mask_backward", "idx", idx_in, "grad_kept", grad_kept);
  TORCH_CHECK(grad_kept.dim() == 3 && idx_in.dim() == 2 && idx_in.size(0) == grad_kept.size(0) &&
                  num_prefix_tokens >= 0 && grad_kept.size(1) == num_prefix_tokens + idx_in.size(1) &&
                  idx_in.size(1) <= num_patches && num_patches <= INT32_MAX && idx_in.scalar_type() == at::kLong,
              "attentive_mask_backward: grad_kept ", grad_kept.sizes(), " and idx ", idx_in.sizes(), " (",
              idx_in.scalar_type(), ") do not match P=", num_prefix_tokens, ", N=", num_patches);
  const c10::cuda::CUDAGuard guard(grad_kept.device());
  const at::Tensor idx = idx_in.contiguous();
  const int64_t Bx = grad_kept.size(0), D = grad_kept.size(2), P = num_prefix_tokens;
  at::Tensor grad_x = at::empty({Bx, P + num_patches, D}, grad_kept.options());
  MaskBackwardArgs a{};
  a.grad_kept = static_cast<const char*>(grad_kept.const_data_ptr());
  a.idx = idx.const_data_ptr<int64_t>();
  a.grad_x = static_cast<char*>(grad_x.mutable_data_ptr());
  a.Bx = Bx;
  a.P = P;
  a.N = num_patches;
  a.M = idx.size(1);
  a.D = D;
  a.elsize = grad_kept.element_size();
  copy_strides(a.gs, grad_kept);
  launch_attentive_mask_backward(a, c10::cuda::getCurrentCUDAStream());
  return grad_x;
}

}  // namespace

TORCH_LIBRARY_IMPL(aclip_kernels, CUDA, m) {
  m.impl("cls_attention", &cls_attention);
  m.impl("attentive_mask", &attentive_mask);
  m.impl("attentive_mask_backward", &attentive_mask_backward);
}

}  // namespace aclip::cuda

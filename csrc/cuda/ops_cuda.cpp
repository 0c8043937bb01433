// The CUDA implementations of the aclip_kernels ops: argument checks (host-side, csrc/checks.h, so
// that bad input raises instead of tripping a device-side assert), allocation, device guard and current stream,
// then the launchers of cls_attention.cu and attentive_mask.cu.
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "../checks.h"
#include "launch.h"

namespace aclip::cuda {
namespace {

// The dtype, already checked to be floating (checks.h).
DType dtype_of(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kHalf: return DType::kHalf;
    case at::kBFloat16: return DType::kBFloat16;
    case at::kDouble: return DType::kDouble;
    default: return DType::kFloat;
  }
}

template <size_t R>
void copy_strides(int64_t (&dst)[R], const at::Tensor& t) {
  for (size_t i = 0; i < R; ++i) dst[i] = t.stride(static_cast<int64_t>(i));
}

at::Tensor cls_attention(const at::Tensor& q, const at::Tensor& k, int64_t num_prefix_tokens, double scale,
                         const std::optional<at::Tensor>& prior) {
  check_device_type("cls_attention", "q", q, at::kCUDA);
  const ClsAttentionShape s = check_cls_attention(q, k, num_prefix_tokens, prior);
  const int64_t B = s.B, H = s.H, Dh = s.Dh, T = s.T, P = s.P;
  const DType dtype = dtype_of(q);
  const c10::cuda::CUDAGuard guard(q.device());
  const auto out_dtype = q.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const at::Tensor base = prior.has_value() ? prior->to(out_dtype).contiguous() : at::Tensor();
  at::Tensor out = at::empty({B, s.N}, q.options().dtype(out_dtype));
  ClsAttentionArgs a{q.const_data_ptr(), k.const_data_ptr(), base.defined() ? base.const_data_ptr() : nullptr,
                     out.mutable_data_ptr(), dtype, B, H, T, Dh, P, {}, {}, scale};
  copy_strides(a.qs, q);
  copy_strides(a.ks, k);
  a.groups = cls_attention_groups(a);
  const at::Tensor partial = a.groups > 1 ? at::empty({B, a.groups, s.N}, out.options()) : at::Tensor();
  a.partial = partial.defined() ? partial.mutable_data_ptr() : nullptr;
  launch_cls_attention(a, c10::cuda::getCurrentCUDAStream());
  return out;
}

std::tuple<at::Tensor, at::Tensor> attentive_mask(
    const at::Tensor& x, const std::optional<at::Tensor>& scores, const std::optional<at::Tensor>& q,
    const std::optional<at::Tensor>& k, const std::optional<at::Tensor>& prior,
    const std::optional<at::Tensor>& boxes, int64_t num_prefix_tokens, at::IntArrayRef score_grid,
    at::IntArrayRef grid, int64_t block, int64_t num_units, double scale) {
  check_device_type("attentive_mask", "x", x, at::kCUDA);
  const MaskShape s = check_attentive_mask(x, scores, q, k, prior, boxes, num_prefix_tokens, score_grid, grid, block,
                                           num_units);
  const int64_t P = s.P, Bx = s.Bx, D = s.D;
  const c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor map = scores.has_value() ? scores->to(at::kFloat).contiguous()
                                            : cls_attention(*q, *k, P, scale, prior).to(at::kFloat);
  const at::Tensor box = boxes.has_value() ? boxes->to(at::kFloat).contiguous() : at::Tensor();
  const int64_t M = s.M;
  at::Tensor kept = at::empty({Bx, P + M, D}, x.options());
  at::Tensor idx = at::empty({Bx, M}, x.options().dtype(at::kLong));
  MaskArgs a{};
  a.x = static_cast<const char*>(x.const_data_ptr());
  a.kept = static_cast<char*>(kept.mutable_data_ptr());
  a.idx = idx.mutable_data_ptr<int64_t>();
  a.map = map.const_data_ptr<float>();
  a.boxes = box.defined() ? box.const_data_ptr<float>() : nullptr;
  a.Bx = Bx;
  a.Bs = s.Bs;
  a.P = P;
  a.D = D;
  a.elsize = x.element_size();
  copy_strides(a.xs, x);
  a.Hs = static_cast<int>(s.Hs);
  a.Ws = static_cast<int>(s.Ws);
  a.Hg = static_cast<int>(s.Hg);
  a.Wg = static_cast<int>(s.Wg);
  a.block = static_cast<int>(block);
  a.num_units = static_cast<int>(num_units);
  a.resample = box.defined() || s.Hs != s.Hg || s.Ws != s.Wg;
  launch_attentive_mask(a, c10::cuda::getCurrentCUDAStream());
  return {kept, idx};
}

at::Tensor attentive_mask_backward(const at::Tensor& grad_kept, const at::Tensor& idx_in, int64_t num_prefix_tokens,
                                   int64_t num_patches) {
  check_device_type("attentive_mask_backward", "grad_kept", grad_kept, at::kCUDA);
  const c10::cuda::CUDAGuard guard(grad_kept.device());
  check_attentive_mask_backward(grad_kept, idx_in, num_prefix_tokens, num_patches);
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

// cls_attention on the CPU: one pass over the keys of each (row, head), fp32 (fp64) accumulation,
// any strides of q and k, parallel over rows.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <vector>

#include "../checks.h"
#include "kernels.h"

namespace aclip::cpu {
namespace {

// Dot product with 8 independent partial sums (vectorisable without reassociating a single sum).
template <typename acc_t>
inline acc_t dot(const acc_t* a, const acc_t* b, int64_t n) {
  acc_t part[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t d = 0;
  for (; d + 8 <= n; d += 8)
    for (int j = 0; j < 8; ++j) part[j] += a[d + j] * b[d + j];
  acc_t total = ((part[0] + part[1]) + (part[2] + part[3])) + ((part[4] + part[5]) + (part[6] + part[7]));
  for (; d < n; ++d) total += a[d] * b[d];
  return total;
}

}  // namespace

at::Tensor cls_attention(const at::Tensor& q, const at::Tensor& k, int64_t num_prefix_tokens,
                         double scale, const std::optional<at::Tensor>& prior) {
  const ClsAttentionShape s = check_cls_attention(q, k, num_prefix_tokens, prior);
  const int64_t B = s.B, H = s.H, Dh = s.Dh, T = s.T, P = s.P, N = s.N;
  const auto out_dtype = q.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor out = prior.has_value() ? prior->to(out_dtype).contiguous().clone()
                                     : at::zeros({B, N}, q.options().dtype(out_dtype));

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "cls_attention_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* qp = q.const_data_ptr<scalar_t>();
    const scalar_t* kp = k.const_data_ptr<scalar_t>();
    const auto qs = q.strides(), ks = k.strides();
    acc_t* op = out.mutable_data_ptr<acc_t>();
    at::parallel_for(0, B, 1, [&](int64_t begin, int64_t end) {
      std::vector<acc_t> logits(T), mean(N), qrow(Dh), krow(Dh);
      for (int64_t b = begin; b < end; ++b) {
        std::fill(mean.begin(), mean.end(), acc_t(0));
        for (int64_t h = 0; h < H; ++h) {
          const scalar_t* qh = qp + b * qs[0] + h * qs[1];
          const scalar_t* kh = kp + b * ks[0] + h * ks[1];
          for (int64_t d = 0; d < Dh; ++d) qrow[d] = static_cast<acc_t>(qh[d * qs[2]]) * static_cast<acc_t>(scale);
          acc_t top = -INFINITY;
          for (int64_t t = 0; t < T; ++t) {
            const scalar_t* kt = kh + t * ks[2];
            for (int64_t d = 0; d < Dh; ++d) krow[d] = static_cast<acc_t>(kt[d * ks[3]]);
            logits[t] = dot(qrow.data(), krow.data(), Dh);
            top = std::max(top, logits[t]);
          }
          acc_t total = 0;
          for (int64_t t = 0; t < T; ++t) {
            logits[t] = std::exp(logits[t] - top);
            total += logits[t];
          }
          const acc_t inv_total = acc_t(1) / total;
          for (int64_t t = 0; t < N; ++t) mean[t] += logits[P + t] * inv_total;
        }
        for (int64_t t = 0; t < N; ++t) op[b * N + t] += mean[t] / static_cast<acc_t>(H);
      }
    });
  });
  return out;
}

TORCH_LIBRARY_IMPL(aclip_kernels, CPU, m) { m.impl("cls_attention", &cls_attention); }

}  // namespace aclip::cpu

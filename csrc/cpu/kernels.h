#pragma once
#include <ATen/ATen.h>

namespace aclip::cpu {

at::Tensor cls_attention(const at::Tensor& q, const at::Tensor& k, int64_t num_prefix_tokens,
                         double scale, const std::optional<at::Tensor>& prior);

}  // namespace aclip::cpu

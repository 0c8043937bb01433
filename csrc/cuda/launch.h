// The CUDA kernels' launchers, called by the op glue in ops_cuda.cpp. Plain types only, so that
// the .cu files do not compile the ATen headers. Arguments have been checked by the caller; the
// launchers only check what depends on the device (shared memory) and the launches themselves.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

namespace aclip::cuda {

enum class DType { kFloat, kHalf, kBFloat16, kDouble };

struct ClsAttentionArgs {
  const void* q;      // [B, H, Dh], strides qs (elements)
  const void* k;      // [B, H, T, Dh], strides ks (elements)
  const void* prior;  // [B, N] contiguous, float (double for double q) or null
  void* out;          // [B, N] contiguous, float (double for double q)
  DType dtype;        // of q and k
  int64_t B, H, T, Dh, P;
  int64_t qs[3], ks[4];
  double scale;
  int64_t groups = 1;      // head groups per image (cls_attention_groups); > 1 needs `partial`
  void* partial = nullptr;  // [B, groups, N] contiguous workspace, of out's dtype
};
// The head groups per image that launch_cls_attention should use on the current device.
int64_t cls_attention_groups(const ClsAttentionArgs& a);
void launch_cls_attention(const ClsAttentionArgs& a, cudaStream_t stream);

struct MaskArgs {
  const char* x;        // [Bx, P+N, D], strides xs (elements of elsize bytes)
  char* kept;           // [Bx, P+M, D] contiguous, M = num_units * block * block
  int64_t* idx;         // [Bx, M] contiguous
  const float* map;     // [Bs, Hs*Ws] contiguous
  const float* boxes;   // [Bx, 4] contiguous or null
  int64_t Bx, Bs, P, D, elsize;
  int64_t xs[3];
  int Hs, Ws, Hg, Wg, block, num_units;
  bool resample;        // sample the map at the online cell centres (boxes, or unequal grids)
};
void launch_attentive_mask(const MaskArgs& a, cudaStream_t stream);

struct MaskBackwardArgs {
  const char* grad_kept;  // [Bx, P+M, D], strides gs (elements of elsize bytes)
  const int64_t* idx;     // [Bx, M] contiguous, ascending
  char* grad_x;           // [Bx, P+N, D] contiguous
  int64_t Bx, P, N, M, D, elsize;
  int64_t gs[3];
};
void launch_attentive_mask_backward(const MaskBackwardArgs& a, cudaStream_t stream);

}  // namespace aclip::cuda

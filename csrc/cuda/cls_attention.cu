// cls_attention on CUDA: a 512-thread block per (image, head group), heads in chunks that fit in
// shared memory. The block computes all logits q_h . k_{h,t} * scale of a chunk, key tile by key
// tile over the chunk's heads: the (key, head) pairs go token-major to groups of lanes, so that a
// warp reads the heads of one token, contiguous in timm's packed qkv layout, and several pairs are in
// flight per lane; each lane reads its share of a key row as 16-byte vectors when the rows allow it
// (contiguous, 16-byte aligned, Dh * itemsize a multiple of 16), else element by element (any
// strides). k is read once. Then one warp per head runs an online softmax over its T logits (running
// max and sum per lane, merged across lanes), and the block's accumulator gets the softmax of each
// head in ascending order. Accumulation in float32 (float64 for float64 inputs); deterministic (no
// atomics).
//
// Split over head groups. One block per image fills the GPU only at training batches; a small batch
// (eval B=8, a micro-batch of 16-64) would leave most SMs idle, each busy one streaming a whole
// image's k. So the grid is (B, G): block (b, g) takes heads [g*H/G, (g+1)*H/G) (G <= H: no group is
// empty, sizes differ by at most one) and G comes from cls_attention_groups: the most groups with
// B * G <= 2 * SMs (one wave at two resident blocks per SM, what B >= 2 * SMs gets unsplit), at
// least 1, at most H. G = 1 is the unsplit path: the block writes prior + sum / H itself, no
// workspace. G > 1: each block writes its sum over its heads to a [B, G, N] workspace and a second
// kernel adds the G partial sums of each score in order g = 0..G-1, then prior + sum / H, so the
// result does not depend on which block finishes first. A second kernel rather than the last block
// of an image reducing (an atomic counter and __threadfence): the counters would have to be zeroed
// before every launch (a memset, another launch anyway) or kept self-resetting in a buffer shared
// by every stream of the device (wrong when two streams run the op at once, or after an aborted
// launch); the second launch reads B * G * N floats, a few percent of the bytes of k.
//
// Bandwidth (an estimate, not a measurement: no GPU here). ViT-B/16 at 224 in bf16, H=12, T=197,
// Dh=64: k is 302,592 bytes per image (q 1.5 KB, the output 784 bytes), the workspace of a split
// 2 * G * N * 4 bytes more (18.8 KB at G=12, 6%). On an H200 (132 SMs, ~4.8 TB/s HBM3e):
//   B=256: G=1,  256 blocks, 77 MB, ~16 us at peak bandwidth;
//   B=64:  G=4,  256 blocks (64 unsplit: half the SMs idle), 19.8 MB, ~4 us at peak;
//   B=8:   G=12, 96 blocks (8 unsplit), 2.6 MB, ~0.5 us at peak: launch latency (a few us per
//          launch, two launches) dominates; unsplit, one SM streams each image's 303 KB, ~8 us at
//          the peak's per-SM share (36 GB/s).
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <cmath>

#include "common.cuh"
#include "launch.h"

namespace aclip::cuda {
namespace {

constexpr int kThreads = 512;
constexpr int kWarps = kThreads / 32;
constexpr int kKeysPerLane = 4;  // keys whose loads a lane has in flight at once
constexpr int kCombineThreads = 256;
constexpr int64_t kMaxGroups = 65535;  // gridDim.y

__device__ __forceinline__ float to_acc(float v) { return v; }
__device__ __forceinline__ double to_acc(double v) { return v; }
__device__ __forceinline__ float to_acc(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_acc(__nv_bfloat16 v) { return __bfloat162float(v); }

__device__ __forceinline__ float exp_acc(float v) { return expf(v); }
__device__ __forceinline__ double exp_acc(double v) { return exp(v); }

// sum * exp(max - top), with an empty part (sum 0) contributing 0 even when max == top == -inf.
template <typename acc_t>
__device__ __forceinline__ acc_t rescaled(acc_t sum, acc_t max, acc_t top) {
  return sum == acc_t(0) ? acc_t(0) : sum * exp_acc(max - top);
}

// out[i] = prior[i] + sum / H, i = b * N + n: the score from the sum of its heads' softmax entries.
template <typename acc_t>
__device__ __forceinline__ void write_score(const ClsAttentionArgs& a, int64_t i, acc_t sum) {
  const auto* prior = static_cast<const acc_t*>(a.prior);
  static_cast<acc_t*>(a.out)[i] = (prior ? prior[i] : acc_t(0)) + sum / static_cast<acc_t>(a.H);
}

// Lanes per (key, head) pair and the number of elements a lane takes per step: one 16-byte vector
// (kVec) or one element.
template <typename scalar_t, bool kVec>
struct KeyLoad {
  static constexpr int kElems = kVec ? 16 / sizeof(scalar_t) : 1;
};

// Two blocks per SM (at most 64 registers a thread), the residency split_groups counts on.
template <typename scalar_t, typename acc_t, bool kVec>
__global__ void __launch_bounds__(kThreads, 2) cls_attention_kernel(ClsAttentionArgs a, int group, int chunk) {
  constexpr int kElems = KeyLoad<scalar_t, kVec>::kElems;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  const int T = static_cast<int>(a.T), Dh = static_cast<int>(a.Dh);
  const int P = static_cast<int>(a.P), N = T - P, steps = Dh / kElems;
  acc_t* qh = reinterpret_cast<acc_t*>(smem_raw);  // [chunk, Dh]
  acc_t* logits = qh + chunk * Dh;                  // [chunk, T]
  acc_t* head_sum = logits + chunk * T;  // [N]: sum over the block's heads
  acc_t* stats = head_sum + N;           // [chunk, 2]: max, sum

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, gl = lane % group;
  const int lane_groups = kThreads / group, keys_per_warp = 32 / group;
  // This block's heads: [h_begin, h_end) of image blockIdx.x.
  const int64_t h_begin = a.H * blockIdx.y / a.groups, h_end = a.H * (blockIdx.y + 1) / a.groups;
  const int group_heads = static_cast<int>(h_end - h_begin);
  const auto* q = static_cast<const scalar_t*>(a.q) + blockIdx.x * a.qs[0] + h_begin * a.qs[1];
  const auto* k = static_cast<const scalar_t*>(a.k) + blockIdx.x * a.ks[0] + h_begin * a.ks[1];
  const acc_t scale = static_cast<acc_t>(a.scale);

  for (int n = tid; n < N; n += kThreads) head_sum[n] = acc_t(0);
  for (int h0 = 0; h0 < group_heads; h0 += chunk) {
    const int heads = min(chunk, group_heads - h0), pairs = heads * T;
    for (int i = tid; i < heads * Dh; i += kThreads)
      qh[i] = to_acc(q[(h0 + i / Dh) * a.qs[1] + (i % Dh) * a.qs[2]]);
    __syncthreads();

    // Logits of the (key, head) pairs, p = t * heads + hh; the loop bound is warp-uniform so that
    // every lane shuffles.
    for (int p0 = warp * keys_per_warp; p0 < pairs; p0 += lane_groups * kKeysPerLane) {
      acc_t dot[kKeysPerLane];
      const scalar_t* kt[kKeysPerLane];
      const acc_t* qv[kKeysPerLane];
      bool valid[kKeysPerLane];
#pragma unroll
      for (int i = 0; i < kKeysPerLane; ++i) {
        const int p = p0 + i * lane_groups + lane / group;
        valid[i] = p < pairs;
        const int t = valid[i] ? p / heads : 0, hh = valid[i] ? p - t * heads : 0;
        kt[i] = k + (h0 + hh) * a.ks[1] + t * a.ks[2];
        qv[i] = qh + hh * Dh;
        dot[i] = acc_t(0);
      }
      for (int step = gl; step < steps; step += group) {
        if constexpr (kVec) {
          uint4 v[kKeysPerLane];
#pragma unroll
          for (int i = 0; i < kKeysPerLane; ++i)
            if (valid[i]) v[i] = reinterpret_cast<const uint4*>(kt[i])[step];
#pragma unroll
          for (int i = 0; i < kKeysPerLane; ++i) {
            if (!valid[i]) continue;
            const scalar_t* e = reinterpret_cast<const scalar_t*>(&v[i]);
            const acc_t* qd = qv[i] + step * kElems;
#pragma unroll
            for (int j = 0; j < kElems; ++j) dot[i] += qd[j] * to_acc(e[j]);
          }
        } else {
          const int64_t offset = step * a.ks[3];
#pragma unroll
          for (int i = 0; i < kKeysPerLane; ++i)
            if (valid[i]) dot[i] += qv[i][step] * to_acc(kt[i][offset]);
        }
      }
#pragma unroll
      for (int i = 0; i < kKeysPerLane; ++i) {
        for (int o = group >> 1; o > 0; o >>= 1) dot[i] += __shfl_xor_sync(0xffffffffu, dot[i], o, group);
        const int p = p0 + i * lane_groups + lane / group;
        if (p < pairs && gl == 0) {
          const int t = p / heads;
          logits[(p - t * heads) * T + t] = dot[i] * scale;
        }
      }
    }
    __syncthreads();

    // Online softmax statistics, one warp per head.
    for (int hh = warp; hh < heads; hh += kWarps) {
      const acc_t* row = logits + hh * T;
      acc_t run_max = -INFINITY, run_sum = acc_t(0);
      for (int t = lane; t < T; t += 32) {
        const acc_t v = row[t];
        if (v > run_max) {
          run_sum = rescaled(run_sum, run_max, v) + acc_t(1);
          run_max = v;
        } else if (v != -INFINITY) {  // -inf adds nothing (and exp(-inf - -inf) would be NaN)
          run_sum += exp_acc(v - run_max);
        }
      }
      for (int o = 16; o > 0; o >>= 1) {
        const acc_t other_max = __shfl_xor_sync(0xffffffffu, run_max, o);
        const acc_t other_sum = __shfl_xor_sync(0xffffffffu, run_sum, o);
        const acc_t top = fmax(run_max, other_max);
        run_sum = rescaled(run_sum, run_max, top) + rescaled(other_sum, other_max, top);
        run_max = top;
      }
      if (lane == 0) {
        stats[2 * hh] = run_max;
        stats[2 * hh + 1] = run_sum;
      }
    }
    __syncthreads();
    for (int n = tid; n < N; n += kThreads) {
      acc_t v = head_sum[n];
      for (int hh = 0; hh < heads; ++hh) v += exp_acc(logits[hh * T + P + n] - stats[2 * hh]) / stats[2 * hh + 1];
      head_sum[n] = v;
    }
    __syncthreads();
  }
  const int64_t b = blockIdx.x;
  if (a.groups > 1) {
    auto* partial = static_cast<acc_t*>(a.partial) + (b * a.groups + blockIdx.y) * N;
    for (int n = tid; n < N; n += kThreads) partial[n] = head_sum[n];
  } else {
    for (int n = tid; n < N; n += kThreads) write_score(a, b * N + n, head_sum[n]);
  }
}

// The G > 1 path's second kernel: score i = b * N + n of out from the [B, G, N] partial sums, added
// in ascending g.
template <typename acc_t>
__global__ void __launch_bounds__(kCombineThreads) cls_attention_combine_kernel(ClsAttentionArgs a) {
  const int64_t N = a.T - a.P, total = a.B * N;
  const auto* partial = static_cast<const acc_t*>(a.partial);
  for (int64_t i = blockIdx.x * int64_t{kCombineThreads} + threadIdx.x; i < total;
       i += int64_t{gridDim.x} * kCombineThreads) {
    const int64_t b = i / N;
    const acc_t* p = partial + b * a.groups * N + (i - b * N);
    acc_t sum = acc_t(0);
    for (int64_t g = 0; g < a.groups; ++g) sum += p[g * N];
    write_score(a, i, sum);
  }
}

// Key rows can be read as 16-byte vectors: contiguous, Dh * itemsize a multiple of 16, and every
// row start 16-byte aligned (base pointer and the other strides).
bool vector_rows(const ClsAttentionArgs& a, int64_t itemsize) {
  const auto aligned = [](int64_t bytes) { return bytes % 16 == 0; };
  return (a.ks[3] == 1 || a.Dh == 1) && aligned(a.Dh * itemsize) &&
         reinterpret_cast<uintptr_t>(a.k) % 16 == 0 && aligned(a.ks[0] * itemsize) &&
         aligned(a.ks[1] * itemsize) && aligned(a.ks[2] * itemsize);
}

template <typename scalar_t, typename acc_t, bool kVec>
void launch_rows(const ClsAttentionArgs& a, cudaStream_t stream) {
  // Lanes per key: about 8 elements (kVec: one vector) of the head dim per lane, at most a warp.
  const int64_t per_lane = kVec ? KeyLoad<scalar_t, kVec>::kElems : 8;
  int group = 1;
  while (group < 32 && group * per_lane < a.Dh) group <<= 1;
  // Heads per chunk: up to one per warp and a group's heads, within 64 KiB of logits and queries.
  const int64_t elem = sizeof(acc_t), N = a.T - a.P;
  int64_t chunk = std::max<int64_t>(1, std::min<int64_t>(ceil_div(a.H, a.groups), kWarps));
  while (chunk > 1 && chunk * (a.Dh + a.T + 2) * elem > 64 * 1024) --chunk;
  const int64_t bytes = (chunk * (a.Dh + a.T + 2) + N) * elem;
  auto kernel = cls_attention_kernel<scalar_t, acc_t, kVec>;
  reserve_shared_memory(kernel, bytes, "cls_attention", "the keys of k (T) and the head dim");
  const dim3 grid(static_cast<unsigned>(a.B), static_cast<unsigned>(a.groups));
  kernel<<<grid, kThreads, bytes, stream>>>(a, group, static_cast<int>(chunk));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  if (a.groups > 1) {
    const auto blocks = static_cast<unsigned>(std::min<int64_t>(ceil_div(a.B * N, kCombineThreads), 1 << 20));
    auto combine = cls_attention_combine_kernel<acc_t>;
    combine<<<blocks, kCombineThreads, 0, stream>>>(a);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

template <typename scalar_t, typename acc_t>
void launch(const ClsAttentionArgs& a, cudaStream_t stream) {
  if (vector_rows(a, sizeof(scalar_t)))
    launch_rows<scalar_t, acc_t, true>(a, stream);
  else
    launch_rows<scalar_t, acc_t, false>(a, stream);
}

// Head groups per image for B images of H heads on `sms` SMs (see the header comment).
int64_t split_groups(int64_t B, int64_t H, int64_t sms) {
  return std::clamp<int64_t>(2 * sms / std::max<int64_t>(B, 1), 1, std::min(H, kMaxGroups));
}

}  // namespace

int64_t cls_attention_groups(const ClsAttentionArgs& a) {
  return split_groups(a.B, a.H, device_attribute(cudaDevAttrMultiProcessorCount));
}

void launch_cls_attention(const ClsAttentionArgs& a, cudaStream_t stream) {
  TORCH_CHECK(a.groups >= 1 && a.groups <= std::min(a.H, kMaxGroups) && (a.groups == 1 || a.partial),
              "cls_attention: groups=", a.groups, " must be in [1, min(H, 65535)] (H=", a.H,
              "), with a workspace when > 1");
  if (a.B == 0) return;
  switch (a.dtype) {
    case DType::kFloat: launch<float, float>(a, stream); break;
    case DType::kHalf: launch<__half, float>(a, stream); break;
    case DType::kBFloat16: launch<__nv_bfloat16, float>(a, stream); break;
    case DType::kDouble: launch<double, double>(a, stream); break;
  }
}

}  // namespace aclip::cuda

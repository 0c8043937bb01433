// cls_attention on CUDA: one thread block per batch row, heads in chunks that fit in shared memory
// (all heads of a ViT-B/L row at once). The block computes all logits q_h . k_{h,t} * scale of a
// chunk, key tile by key tile over the chunk's heads: the (key, head) pairs go token-major to groups
// of lanes, so that a warp reads the heads of one token, contiguous in timm's packed qkv layout, and
// several pairs are in flight per lane; each lane reads its share of a key row as 16-byte vectors
// when the rows allow it (contiguous, 16-byte aligned, Dh * itemsize a multiple of 16), else element
// by element (any strides). k is read once. Then one warp per head runs an online softmax over its T
// logits (running max and sum per lane, merged across lanes), and the row's accumulator gets
// softmax / H, heads in ascending order. Accumulation in float32 (float64 for float64 inputs);
// deterministic (no atomics).
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

// Lanes per (key, head) pair and the number of elements a lane takes per step: one 16-byte vector
// (kVec) or one element.
template <typename scalar_t, bool kVec>
struct KeyLoad {
  static constexpr int kElems = kVec ? 16 / sizeof(scalar_t) : 1;
};

template <typename scalar_t, typename acc_t, bool kVec>
__global__ void __launch_bounds__(kThreads) cls_attention_kernel(ClsAttentionArgs a, int group, int chunk) {
  constexpr int kElems = KeyLoad<scalar_t, kVec>::kElems;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  const int H = static_cast<int>(a.H), T = static_cast<int>(a.T), Dh = static_cast<int>(a.Dh);
  const int P = static_cast<int>(a.P), N = T - P, steps = Dh / kElems;
  acc_t* qh = reinterpret_cast<acc_t*>(smem_raw);  // [chunk, Dh]
  acc_t* logits = qh + chunk * Dh;                  // [chunk, T]
  acc_t* mean = logits + chunk * T;                 // [N]
  acc_t* stats = mean + N;                          // [chunk, 2]: max, sum

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, gl = lane % group;
  const int groups = kThreads / group, keys_per_warp = 32 / group;
  const int64_t b = blockIdx.x;
  const auto* q = static_cast<const scalar_t*>(a.q) + b * a.qs[0];
  const auto* k = static_cast<const scalar_t*>(a.k) + b * a.ks[0];
  const acc_t scale = static_cast<acc_t>(a.scale);

  for (int n = tid; n < N; n += kThreads) mean[n] = acc_t(0);
  for (int h0 = 0; h0 < H; h0 += chunk) {
    const int heads = min(chunk, H - h0), pairs = heads * T;
    for (int i = tid; i < heads * Dh; i += kThreads)
      qh[i] = to_acc(q[(h0 + i / Dh) * a.qs[1] + (i % Dh) * a.qs[2]]);
    __syncthreads();

    // Logits of the (key, head) pairs, p = t * heads + hh; the loop bound is warp-uniform so that
    // every lane shuffles.
    for (int p0 = warp * keys_per_warp; p0 < pairs; p0 += groups * kKeysPerLane) {
      acc_t dot[kKeysPerLane];
      const scalar_t* kt[kKeysPerLane];
      const acc_t* qv[kKeysPerLane];
      bool valid[kKeysPerLane];
#pragma unroll
      for (int i = 0; i < kKeysPerLane; ++i) {
        const int p = p0 + i * groups + lane / group;
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
        const int p = p0 + i * groups + lane / group;
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
      acc_t v = mean[n];
      for (int hh = 0; hh < heads; ++hh) v += exp_acc(logits[hh * T + P + n] - stats[2 * hh]) / stats[2 * hh + 1];
      mean[n] = v;
    }
    __syncthreads();
  }
  const auto* prior = static_cast<const acc_t*>(a.prior);
  auto* out = static_cast<acc_t*>(a.out) + b * N;
  const acc_t num_heads = static_cast<acc_t>(H);
  for (int n = tid; n < N; n += kThreads) {
    const acc_t base = prior ? prior[b * N + n] : acc_t(0);
    out[n] = base + mean[n] / num_heads;
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
  // Heads per chunk: up to one per warp, within 64 KiB of logits and queries.
  const int64_t elem = sizeof(acc_t), N = a.T - a.P;
  int64_t chunk = std::max<int64_t>(1, std::min<int64_t>(a.H, kWarps));
  while (chunk > 1 && chunk * (a.Dh + a.T + 2) * elem > 64 * 1024) --chunk;
  const int64_t bytes = (chunk * (a.Dh + a.T + 2) + N) * elem;
  auto kernel = cls_attention_kernel<scalar_t, acc_t, kVec>;
  reserve_shared_memory(kernel, bytes, "cls_attention", "the keys of k (T) and the head dim");
  kernel<<<static_cast<unsigned>(a.B), kThreads, bytes, stream>>>(a, group, static_cast<int>(chunk));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename scalar_t, typename acc_t>
void launch(const ClsAttentionArgs& a, cudaStream_t stream) {
  if (vector_rows(a, sizeof(scalar_t)))
    launch_rows<scalar_t, acc_t, true>(a, stream);
  else
    launch_rows<scalar_t, acc_t, false>(a, stream);
}

}  // namespace

void launch_cls_attention(const ClsAttentionArgs& a, cudaStream_t stream) {
  if (a.B == 0) return;
  switch (a.dtype) {
    case DType::kFloat: launch<float, float>(a, stream); break;
    case DType::kHalf: launch<__half, float>(a, stream); break;
    case DType::kBFloat16: launch<__nv_bfloat16, float>(a, stream); break;
    case DType::kDouble: launch<double, double>(a, stream); break;
  }
}

}  // namespace aclip::cuda

// attentive_mask on CUDA. Forward: one thread block per output row (view); small batches split each
// row's copy over several blocks that each redo the (cheap) selection. A block scores its units
// into shared memory (box alignment and block means in the float32 order of mask_math.h), finds
// the n best by their rank keys (counting the keys above each unit on small grids, a block-wide
// bitonic sort on large ones), turns them into ascending patch positions with a block-wide scan,
// and copies the prefix and kept rows, one warp per row (16-byte vectors between a head and a tail
// of bytes where the addresses allow, for any row width). Backward: each row of grad_x is written
// once, from grad_kept or as zeros.
#include <algorithm>
#include <type_traits>

#include "../mask_math.h"
#include "common.cuh"
#include "launch.h"

namespace aclip::cuda {
namespace {

constexpr int kThreads = 512;
constexpr int kCountedUnits = 256;

struct MaskLaunch {
  MaskArgs a;
  int L;          // the sort length: the number of units rounded up to a power of two
  CopyPlan copy;  // of the rows of x
};

// One warp copies a row: as bytes (Elem = void: contiguous rows; kUnroll loads in flight per lane)
// or as `Elem` elements `plan.step` apart (two loads in flight per lane). Both keep the kernels
// within 64 registers without spills (ptxas -v, sm_80 and sm_90).
template <typename Elem, int kUnroll = 4>
__device__ __forceinline__ void warp_copy(char* dst, const char* src, const CopyPlan& plan, int lane) {
  if constexpr (std::is_void_v<Elem>)
    warp_copy_bytes<kUnroll>(dst, src, plan.units, lane);
  else
    warp_copy_row<2>(reinterpret_cast<Elem*>(dst), reinterpret_cast<const Elem*>(src), plan.step, plan.units, lane);
}

template <typename Elem>
__global__ void __launch_bounds__(kThreads, 2) attentive_mask_kernel(MaskLaunch launch) {
  const MaskArgs& a = launch.a;
  const int L = launch.L;
  const int b = a.block, Wu = a.Wg / b, U = (a.Hg / b) * Wu, N = a.Hg * a.Wg;
  const int M = a.num_units * b * b;
  const int tid = threadIdx.x;
  const int64_t r = blockIdx.x;

  extern __shared__ __align__(16) unsigned char smem_raw[];
  uint64_t* keys = reinterpret_cast<uint64_t*>(smem_raw);     // [L]
  int* patches = reinterpret_cast<int*>(keys + L);              // [M] patch of each kept slot
  int* warp_sums = patches + M;                                 // [32]
  unsigned char* unit_kept = reinterpret_cast<unsigned char*>(warp_sums + 32);  // [U]

  // 1. The rank key of every unit: the cell scores (sampled in the view's box when resampling),
  //    summed row-major over the block and divided by b*b, as pool_blocks_ref does.
  const float* map = a.map + (r % a.Bs) * static_cast<int64_t>(a.Hs) * a.Ws;
  float y0 = 0.f, x0 = 0.f, h = 1.f, w = 1.f;
  if (a.boxes) {
    y0 = a.boxes[4 * r];
    x0 = a.boxes[4 * r + 1];
    h = a.boxes[4 * r + 2];
    w = a.boxes[4 * r + 3];
  }
  auto cell = [&](int row, int col) -> float {
    if (!a.resample) return map[row * a.Wg + col];
    return bilinear(map, a.Ws, sample_coord(y0, h, row, a.Hg, a.Hs), sample_coord(x0, w, col, a.Wg, a.Ws));
  };
  for (int u = tid; u < L; u += kThreads) {
    uint64_t key = 0;  // padding ranks below every unit (a NaN unit's key is > 0)
    if (u < U) {
      const int row = (u / Wu) * b, col = (u % Wu) * b;
      float total = cell(row, col);
      for (int i = 0; i < b; ++i)
        for (int j = 0; j < b; ++j)
          if (i || j) total = ACLIP_ADD(total, cell(row + i, col + j));
      if (b > 1) total = ACLIP_DIV(total, static_cast<float>(b * b));
      key = rank_key(total, u);
      if (U > kCountedUnits) unit_kept[u] = 0;
    }
    keys[u] = key;
  }
  __syncthreads();

  // 2. The n best units. Up to kCountedUnits units, each thread counts the keys above its unit's
  //    (no barriers; a ViT-B grid takes ~200 steps). Beyond, a bitonic sort, descending; every
  //    thread handles pairs (i, i | j) with bit j of i clear.
  if (U <= kCountedUnits) {
    for (int u = tid; u < U; u += kThreads) {
      const uint64_t key = keys[u];
      int above = 0;
      for (int v = 0; v < U; ++v) above += keys[v] > key;
      unit_kept[u] = above < a.num_units;
    }
    __syncthreads();
  } else {
    if (a.num_units < U) {
      for (int k = 2; k <= L; k <<= 1) {
        for (int j = k >> 1; j > 0; j >>= 1) {
          for (int t = tid; t < L / 2; t += kThreads) {
            const int i = ((t & ~(j - 1)) << 1) | (t & (j - 1));
            const int p = i | j;
            const uint64_t ki = keys[i], kp = keys[p];
            if ((i & k) == 0 ? ki < kp : ki > kp) {
              keys[i] = kp;
              keys[p] = ki;
            }
          }
          __syncthreads();
        }
      }
    }
    // Unsorted (all kept) or sorted, the first num_units keys are the kept units.
    for (int i = tid; i < a.num_units; i += kThreads) unit_kept[~static_cast<uint32_t>(keys[i])] = 1;
    __syncthreads();
  }

  // 3. Ascending positions of the kept patches: each thread scans a contiguous chunk of patches.
  const int chunk = static_cast<int>((N + kThreads - 1) / kThreads);
  const int begin = min(N, tid * chunk), end = min(N, begin + chunk);
  auto patch_kept = [&](int t) { return unit_kept[(t / a.Wg / b) * Wu + (t % a.Wg) / b]; };
  int count = 0;
  for (int t = begin; t < end; ++t) count += patch_kept(t);
  int slot = block_exclusive_scan(count, warp_sums);
  int64_t* idx = blockIdx.y == 0 ? a.idx + r * M : nullptr;
  for (int t = begin; t < end; ++t) {
    if (!patch_kept(t)) continue;
    patches[slot] = t;
    if (idx) idx[slot] = t;
    ++slot;
  }
  __syncthreads();

  // 4. This block's share of the rows of kept[r]: prefix rows, then the kept patches.
  const int64_t rows = a.P + M;
  const int64_t first = rows * blockIdx.y / gridDim.y, last = rows * (blockIdx.y + 1) / gridDim.y;
  const int lane = tid & 31, warp = tid >> 5;
  const int64_t row_bytes = a.D * a.elsize;
  const char* src_row0 = a.x + r * a.xs[0] * a.elsize;
  char* dst = a.kept + r * rows * row_bytes;
  for (int64_t j = first + warp; j < last; j += kThreads / 32) {
    const int64_t token = j < a.P ? j : a.P + patches[j - a.P];
    warp_copy<Elem>(dst + j * row_bytes, src_row0 + token * a.xs[1] * a.elsize, launch.copy, lane);
  }
}

struct BackwardLaunch {
  MaskBackwardArgs a;
  CopyPlan copy;  // of the rows of grad_kept
};

template <typename Elem>
__global__ void __launch_bounds__(kThreads, 2) attentive_mask_backward_kernel(BackwardLaunch launch) {
  const MaskBackwardArgs& a = launch.a;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int64_t r = blockIdx.x, N = a.N, M = a.M, P = a.P, T = P + N;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  int* slot_of = reinterpret_cast<int*>(smem_raw);  // [N]: the kept slot of each patch, or -1

  for (int64_t t = tid; t < N; t += kThreads) slot_of[t] = -1;
  __syncthreads();
  const int64_t* idx = a.idx + r * M;
  for (int64_t j = tid; j < M; j += kThreads) {
    const int64_t t = idx[j];
    if (t >= 0 && t < N) slot_of[t] = static_cast<int>(j);
  }
  __syncthreads();

  const int64_t first = T * blockIdx.y / gridDim.y, last = T * (blockIdx.y + 1) / gridDim.y;
  const int64_t row_bytes = a.D * a.elsize;
  const char* src_row0 = a.grad_kept + r * a.gs[0] * a.elsize;
  char* dst = a.grad_x + r * T * row_bytes;
  // The dropped patches' rows as zeros, then the others from grad_kept (two loops: fewer live registers).
  for (int64_t t = (first > P ? first : P) + warp; t < last; t += kThreads / 32)
    if (slot_of[t - P] < 0) warp_zero_bytes(dst + t * row_bytes, static_cast<int>(row_bytes), lane);
  const int64_t src_step = a.gs[1] * a.elsize;
  for (int64_t t = first + warp; t < last; t += kThreads / 32) {
    const int slot = t < P ? -1 : slot_of[t - P];
    if (t < P || slot >= 0) warp_copy<Elem, 3>(dst + t * row_bytes, src_row0 + (t < P ? t : P + slot) * src_step,
                                            launch.copy, lane);
  }
}

// Blocks per row so that a small batch still has about four blocks per SM to stream its rows,
// with at least 16 rows per block.
unsigned row_splits(int64_t batch, int64_t rows) {
  const int64_t sms = device_attribute(cudaDevAttrMultiProcessorCount);
  const int64_t want = ceil_div(4 * sms, batch), most = std::max<int64_t>(1, rows / 16);
  return static_cast<unsigned>(std::max<int64_t>(1, std::min({want, most, int64_t{65535}})));
}

}  // namespace

void launch_attentive_mask(const MaskArgs& a, cudaStream_t stream) {
  if (a.Bx == 0) return;
  const int U = (a.Hg / a.block) * (a.Wg / a.block);
  int L = 1;
  while (L < U) L <<= 1;
  const int64_t M = static_cast<int64_t>(a.num_units) * a.block * a.block;
  const int64_t bytes = 8 * static_cast<int64_t>(L) + 4 * (M + 32) + U;
  const MaskLaunch launch{a, L, plan_row_copy(a.D, a.elsize, a.xs[2])};
  const dim3 grid(static_cast<unsigned>(a.Bx), row_splits(a.Bx, a.P + M));
  dispatch_unit(launch.copy.elem, [&](auto unit) {
    auto kernel = attentive_mask_kernel<typename decltype(unit)::type>;
    reserve_shared_memory(kernel, bytes, "attentive_mask", "the units of the grid");
    kernel<<<grid, kThreads, bytes, stream>>>(launch);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

void launch_attentive_mask_backward(const MaskBackwardArgs& a, cudaStream_t stream) {
  if (a.Bx == 0) return;
  const int64_t bytes = 4 * std::max<int64_t>(a.N, 1);
  const BackwardLaunch launch{a, plan_row_copy(a.D, a.elsize, a.gs[2])};
  const dim3 grid(static_cast<unsigned>(a.Bx), row_splits(a.Bx, a.P + a.N));
  dispatch_unit(launch.copy.elem, [&](auto unit) {
    auto kernel = attentive_mask_backward_kernel<typename decltype(unit)::type>;
    reserve_shared_memory(kernel, bytes, "attentive_mask_backward", "the patches of x (N)");
    kernel<<<grid, kThreads, bytes, stream>>>(launch);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

}  // namespace aclip::cuda

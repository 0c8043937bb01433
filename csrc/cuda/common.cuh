// Device helpers shared by the CUDA kernels.
#pragma once

#include <c10/cuda/CUDAException.h>
#include <c10/util/Exception.h>
#include <cuda_runtime.h>

#include <cstdint>

namespace aclip::cuda {

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

inline int device_attribute(cudaDeviceAttr attr) {
  int device = 0, value = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&value, attr, device));
  return value;
}

// Lets `kernel` use `bytes` of dynamic shared memory (beyond the default 48 KiB when needed), or
// fails with a message naming the shapes that asked for it.
template <typename Kernel>
void reserve_shared_memory(Kernel kernel, int64_t bytes, const char* op, const char* what) {
  const int64_t limit = device_attribute(cudaDevAttrMaxSharedMemoryPerBlockOptin);
  TORCH_CHECK(bytes <= limit, op, ": ", what, " need ", bytes, " bytes of shared memory per block; the device has ",
              limit);
  if (bytes > 48 * 1024)
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes)));
}

// Exclusive prefix sum of `value` over the block (blockDim.x a multiple of 32); `warp_sums` holds
// 32 ints of shared memory. Every thread of the block must call it.
__device__ __forceinline__ int block_exclusive_scan(int value, int* warp_sums) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
  int inclusive = value;
#pragma unroll
  for (int o = 1; o < 32; o <<= 1) {
    const int y = __shfl_up_sync(0xffffffffu, inclusive, o);
    if (lane >= o) inclusive += y;
  }
  if (lane == 31) warp_sums[warp] = inclusive;
  __syncthreads();
  if (warp == 0) {
    int total = lane < warps ? warp_sums[lane] : 0;
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
      const int y = __shfl_up_sync(0xffffffffu, total, o);
      if (lane >= o) total += y;
    }
    if (lane < warps) warp_sums[lane] = total;
  }
  __syncthreads();
  return inclusive - value + (warp > 0 ? warp_sums[warp - 1] : 0);
}

// Copy units: rows are moved as arrays of W-byte units, W the widest of 16/8/4/2/1 that the row
// width, the strides and the base pointers allow (16-byte vectors for aligned rows whose byte
// width is a multiple of 16; the narrower units are the tail path for other widths and offsets).
template <int W> struct Unit;
template <> struct Unit<16> { using type = uint4; };
template <> struct Unit<8> { using type = uint2; };
template <> struct Unit<4> { using type = uint32_t; };
template <> struct Unit<2> { using type = uint16_t; };
template <> struct Unit<1> { using type = uint8_t; };

// One warp copies a row of `units` units; source unit j at src[j * step].
template <typename U>
__device__ __forceinline__ void warp_copy_row(U* __restrict__ dst, const U* __restrict__ src, int64_t step,
                                              int units, int lane) {
  constexpr int kUnroll = 4;
  for (int base = lane; base < units; base += 32 * kUnroll) {
    U v[kUnroll];
#pragma unroll
    for (int i = 0; i < kUnroll; ++i) {
      const int j = base + 32 * i;
      if (j < units) v[i] = src[j * step];
    }
#pragma unroll
    for (int i = 0; i < kUnroll; ++i) {
      const int j = base + 32 * i;
      if (j < units) dst[j] = v[i];
    }
  }
}

template <typename U>
__device__ __forceinline__ void warp_zero_row(U* __restrict__ dst, int units, int lane) {
  const U zero{};
  for (int j = lane; j < units; j += 32) dst[j] = zero;
}

// How rows of `width` elements of `elsize` bytes are copied from a source with element strides
// (s0, s1, s2) at `src` to a contiguous destination at `dst`.
struct CopyPlan {
  int unit;        // bytes per unit
  int units;       // units per row
  int64_t step;    // source units between consecutive units of a row
};

inline CopyPlan plan_row_copy(const void* src, const void* dst, int64_t width, int64_t elsize, int64_t s0,
                              int64_t s1, int64_t s2) {
  if (width > 1 && s2 != 1) return {static_cast<int>(elsize), static_cast<int>(width), s2};
  const auto a = reinterpret_cast<uintptr_t>(src), b = reinterpret_cast<uintptr_t>(dst);
  const int64_t bytes = width * elsize;
  for (int w = 16; w > 1; w >>= 1)
    if (bytes % w == 0 && a % w == 0 && b % w == 0 && (s0 * elsize) % w == 0 && (s1 * elsize) % w == 0)
      return {w, static_cast<int>(bytes / w), 1};
  return {1, static_cast<int>(bytes), 1};
}

// Calls f(Unit<W>::type{}) for the plan's unit width.
template <typename F>
void dispatch_unit(int unit, F&& f) {
  switch (unit) {
    case 16: f(uint4{}); break;
    case 8: f(uint2{}); break;
    case 4: f(uint32_t{}); break;
    case 2: f(uint16_t{}); break;
    case 1: f(uint8_t{}); break;
    default: TORCH_CHECK(false, "aclip_kernels: cannot copy elements of ", unit, " bytes");
  }
}

}  // namespace aclip::cuda

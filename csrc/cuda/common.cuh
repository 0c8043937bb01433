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

// Copy units of 16, 8, 4, 2 or 1 bytes. Contiguous rows move as bytes (warp_copy_bytes: a head and a
// tail of bytes around a body of the widest unit that the source and destination addresses allow,
// 16-byte vectors when they agree modulo 16, whatever the row width); rows with a strided last
// dimension move element by element (warp_copy_row with the element's unit and a source step).

// One warp copies a row of `units` units, kUnroll loads in flight per lane; source unit j at
// src[j * step] (units < 2**31: checks.h bounds a row's bytes).
template <int kUnroll = 4, typename U>
__device__ __forceinline__ void warp_copy_row(U* __restrict__ dst, const U* __restrict__ src, int64_t step, int units,
                                              int lane) {
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

// The bytes [0, head) before dst's first `w`-aligned address and the body of whole w-byte units
// after it, for a row of `bytes` bytes (w a power of two).
struct Split {
  int head, body;
};
__device__ __forceinline__ Split split_row(const void* dst, int bytes, int w) {
  const int to_aligned = (w - static_cast<int>(reinterpret_cast<uintptr_t>(dst) & (w - 1))) & (w - 1);
  const int head = to_aligned < bytes ? to_aligned : bytes;
  return {head, (bytes - head) / w};
}

template <int kUnroll, typename U>
__device__ __forceinline__ void warp_copy_body(char* dst, const char* src, int units, int lane) {
  warp_copy_row<kUnroll>(reinterpret_cast<U*>(dst), reinterpret_cast<const U*>(src), 1, units, lane);
}

// One warp copies `bytes` contiguous bytes: the head and the tail (under 16 bytes each) one byte per
// lane, the body in units of the largest power of two (up to 16) dividing dst - src.
template <int kUnroll = 4>
__device__ __forceinline__ void warp_copy_bytes(char* __restrict__ dst, const char* __restrict__ src, int bytes,
                                                int lane) {
  const auto diff = static_cast<unsigned>((reinterpret_cast<uintptr_t>(src) ^ reinterpret_cast<uintptr_t>(dst)) & 15u);
  const int w = diff ? static_cast<int>(diff & (0u - diff)) : 16;
  const Split s = split_row(dst, bytes, w);
  const int tail = s.head + s.body * w;
  if (lane < s.head) dst[lane] = src[lane];
  if (lane < bytes - tail) dst[tail + lane] = src[tail + lane];
  char* d = dst + s.head;
  const char* from = src + s.head;
  switch (w) {
    case 16: warp_copy_body<kUnroll, uint4>(d, from, s.body, lane); break;
    case 8: warp_copy_body<kUnroll, uint2>(d, from, s.body, lane); break;
    case 4: warp_copy_body<kUnroll, uint32_t>(d, from, s.body, lane); break;
    case 2: warp_copy_body<kUnroll, uint16_t>(d, from, s.body, lane); break;
    default: warp_copy_body<kUnroll, uint8_t>(d, from, s.body, lane); break;
  }
}

// One warp zeroes `bytes` contiguous bytes: 16-byte stores between a head and a tail of bytes.
__device__ __forceinline__ void warp_zero_bytes(char* __restrict__ dst, int bytes, int lane) {
  const Split s = split_row(dst, bytes, 16);
  const int tail = s.head + s.body * 16;
  if (lane < s.head) dst[lane] = 0;
  if (lane < bytes - tail) dst[tail + lane] = 0;
  uint4* body = reinterpret_cast<uint4*>(dst + s.head);
  const uint4 zero{};
  for (int j = lane; j < s.body; j += 32) body[j] = zero;
}

// How rows of `width` elements of `elsize` bytes, the source's elements `s2` apart, are copied to a
// contiguous destination.
struct CopyPlan {
  int elem;        // 0: contiguous rows, copied as bytes; else the element's bytes (a strided row)
  int units;       // per row: bytes (contiguous) or elements (strided)
  int64_t step;    // source elements between consecutive elements of a strided row
};

inline CopyPlan plan_row_copy(int64_t width, int64_t elsize, int64_t s2) {
  if (width > 1 && s2 != 1) return {static_cast<int>(elsize), static_cast<int>(width), s2};
  return {0, static_cast<int>(width * elsize), 1};
}

template <typename T> struct Tag { using type = T; };

// Calls f(Tag<T>{}) for the unsigned type T of `elem` bytes (uint2: 8 bytes), T = void for
// contiguous rows (elem 0).
template <typename F>
void dispatch_unit(int elem, F&& f) {
  switch (elem) {
    case 0: f(Tag<void>{}); break;
    case 1: f(Tag<uint8_t>{}); break;
    case 2: f(Tag<uint16_t>{}); break;
    case 4: f(Tag<uint32_t>{}); break;
    case 8: f(Tag<uint2>{}); break;
    default: TORCH_CHECK(false, "aclip_kernels: cannot copy elements of ", elem, " bytes");
  }
}

}  // namespace aclip::cuda

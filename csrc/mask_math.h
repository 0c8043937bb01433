// Arithmetic shared by the CPU and CUDA kernels of attentive_mask. Every operation below is one
// IEEE float32 operation in the order of aclip_kernels/reference.py, so that all backends compute
// bit-identical scores and select the same patches. (CPU sources build with -ffp-contract=off; the
// CUDA path uses the _rn intrinsics, which nvcc never contracts into FMAs.)
#pragma once

#include <cmath>
#include <cstdint>

#ifdef __CUDACC__
#define ACLIP_HD __host__ __device__ __forceinline__
#else
#define ACLIP_HD inline
#endif
#ifdef __CUDA_ARCH__  // the _rn intrinsics exist in device code only
#define ACLIP_MUL(a, b) __fmul_rn((a), (b))
#define ACLIP_ADD(a, b) __fadd_rn((a), (b))
#define ACLIP_SUB(a, b) __fsub_rn((a), (b))
#define ACLIP_DIV(a, b) __fdiv_rn((a), (b))
#else
#define ACLIP_MUL(a, b) ((a) * (b))
#define ACLIP_ADD(a, b) ((a) + (b))
#define ACLIP_SUB(a, b) ((a) - (b))
#define ACLIP_DIV(a, b) ((a) / (b))
#endif

namespace aclip {

// Where online cell `cell` (of `cells` along one axis) samples a score map of `size` pixels.
struct SampleCoord {
  int lo, hi;
  float frac;
};

ACLIP_HD SampleCoord sample_coord(float origin, float extent, int cell, int cells, int size) {
  const float centre = ACLIP_DIV(static_cast<float>(cell) + 0.5f, static_cast<float>(cells));
  const float pos = ACLIP_ADD(origin, ACLIP_MUL(centre, extent));
  float pix = ACLIP_SUB(ACLIP_MUL(pos, static_cast<float>(size)), 0.5f);
  const float top = static_cast<float>(size - 1);
  pix = pix > 0.f ? (pix < top ? pix : top) : 0.f;  // border clamp; a NaN (from a non-finite box) to 0
  const float lo = floorf(pix);
  SampleCoord c;
  c.lo = static_cast<int>(lo);
  c.hi = c.lo + 1 < size ? c.lo + 1 : size - 1;
  c.frac = ACLIP_SUB(pix, lo);
  return c;
}

// Bilinear sample of row-major map[size_y * size_x] at (ys, xs).
ACLIP_HD float bilinear(const float* map, int size_x, SampleCoord ys, SampleCoord xs) {
  const float one_wx = ACLIP_SUB(1.f, xs.frac), one_wy = ACLIP_SUB(1.f, ys.frac);
  const float* r0 = map + static_cast<int64_t>(ys.lo) * size_x;
  const float* r1 = map + static_cast<int64_t>(ys.hi) * size_x;
  const float top = ACLIP_ADD(ACLIP_MUL(r0[xs.lo], one_wx), ACLIP_MUL(r0[xs.hi], xs.frac));
  const float bottom = ACLIP_ADD(ACLIP_MUL(r1[xs.lo], one_wx), ACLIP_MUL(r1[xs.hi], xs.frac));
  return ACLIP_ADD(ACLIP_MUL(top, one_wy), ACLIP_MUL(bottom, ys.frac));
}

// Unit `a` ranks before unit `b`: higher score, ties to the lower index, NaN after every number.
ACLIP_HD bool ranks_before(float sa, int a, float sb, int b) {
  const bool na = sa != sa, nb = sb != sb;
  if (na || nb) return na == nb ? a < b : nb;
  if (sa != sb) return sa > sb;
  return a < b;
}

// A total-order sort key: larger key = better unit (score desc, then index asc, NaN last).
// The high 32 bits map the float monotonically (NaN to 0, below -inf, whose key is 0x007FFFFF);
// the low 32 bits hold the inverted index so that the lower index wins a tie.
ACLIP_HD uint64_t rank_key(float s, int index) {
  uint32_t bits;
#ifdef __CUDA_ARCH__
  bits = __float_as_uint(s);
#else
  static_assert(sizeof(float) == sizeof(uint32_t), "float is 32-bit");
  __builtin_memcpy(&bits, &s, sizeof bits);
#endif
  uint32_t mono;
  if (s != s) {
    mono = 0u;
  } else {
    if (s == 0.f) bits = 0u;  // -0.0 ties with +0.0
    mono = (bits & 0x80000000u) ? ~bits : (bits | 0x80000000u);
  }
  return (static_cast<uint64_t>(mono) << 32) | static_cast<uint32_t>(~static_cast<uint32_t>(index));
}

}  // namespace aclip

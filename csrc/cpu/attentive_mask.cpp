// attentive_mask on the CPU: per output row (view), align the image's scores to the view's box,
// pool b x b blocks, select the top units by their rank keys (nth_element), expand them to
// ascending patch positions and copy the prefix and kept rows, a run of adjacent rows per memcpy.
// The selection of the next row runs while the first source rows of this one, prefetched, arrive
// from memory. The backward writes each row of grad_x once.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <functional>
#include <vector>

#include "../checks.h"
#include "../mask_math.h"
#include "kernels.h"

namespace aclip::cpu {
namespace {

// Copies one token row of `width` elements of `elsize` bytes; src elements `src_stride` apart.
// Contiguous rows go through memcpy (a vectorised body and a tail for any width); strided rows
// through a typed loop, so that no element costs a call.
template <typename T>
inline void copy_strided(char* dst, const char* src, int64_t width, int64_t src_stride) {
  T* d = reinterpret_cast<T*>(dst);
  for (int64_t i = 0; i < width; ++i) std::memcpy(d + i, src + i * src_stride * int64_t{sizeof(T)}, sizeof(T));
}

inline void copy_row(char* dst, const char* src, int64_t width, int64_t src_stride, int64_t elsize) {
  if (src_stride == 1 || width == 1) {
    std::memcpy(dst, src, width * elsize);
    return;
  }
  switch (elsize) {
    case 2: copy_strided<uint16_t>(dst, src, width, src_stride); break;
    case 4: copy_strided<uint32_t>(dst, src, width, src_stride); break;
    default: copy_strided<uint64_t>(dst, src, width, src_stride); break;
  }
}

// t as a contiguous float32 tensor; t itself when it is one (two dispatcher calls saved per call).
at::Tensor float_contiguous(const at::Tensor& t) {
  return t.scalar_type() == at::kFloat && t.is_contiguous() ? t : t.to(at::kFloat).contiguous();
}

struct Geometry {
  int64_t Hs, Ws, Hg, Wg, block, Hu, Wu;
  bool resample;
};

// Per-row scratch, allocated once per thread.
struct Scratch {
  std::vector<float> cells, units;
  std::vector<SampleCoord> cols;
  std::vector<uint64_t> keys, sorted;
  explicit Scratch(const Geometry& g)
      : cells(g.Hg * g.Wg), units(g.Hu * g.Wu), cols(g.Wg), keys(g.Hu * g.Wu), sorted(g.Hu * g.Wu) {}
};

// Scores of every unit of one row: align (if needed), then block means, into s.units.
void unit_scores(const float* map, const float* box, const Geometry& g, Scratch& s) {
  const int64_t N = g.Hg * g.Wg;
  float* cells = s.cells.data();
  float* units = s.units.data();
  if (g.resample) {
    const float y0 = box ? box[0] : 0.f, x0 = box ? box[1] : 0.f;
    const float h = box ? box[2] : 1.f, w = box ? box[3] : 1.f;
    for (int64_t c = 0; c < g.Wg; ++c) s.cols[c] = sample_coord(x0, w, c, g.Wg, g.Ws);
    for (int64_t r = 0; r < g.Hg; ++r) {
      const SampleCoord ys = sample_coord(y0, h, r, g.Hg, g.Hs);
      for (int64_t c = 0; c < g.Wg; ++c) cells[r * g.Wg + c] = bilinear(map, g.Ws, ys, s.cols[c]);
    }
  } else {
    std::copy(map, map + N, cells);
  }
  const int64_t b = g.block;
  if (b == 1) {
    std::copy(cells, cells + N, units);
    return;
  }
  const float area = static_cast<float>(b * b);
  for (int64_t ur = 0; ur < g.Hu; ++ur)
    for (int64_t uc = 0; uc < g.Wu; ++uc) {
      const float* cell = cells + ur * b * g.Wg + uc * b;
      float total = cell[0];
      for (int64_t i = 0; i < b; ++i)
        for (int64_t j = 0; j < b; ++j)
          if (i || j) total += cell[i * g.Wg + j];
      units[ur * g.Wu + uc] = total / area;
    }
}

// unit_kept[u] = unit u is among the `n` best of s.units: the n largest rank keys (distinct, so
// the n-th largest is a threshold), found by nth_element on the plain 64-bit keys. On a ViT-B grid
// of 2x2 units (U = 49) that costs about 0.2 us, against 0.4 us for nth_element on unit indices with
// the float comparator and 2 us for counting the keys above each unit (U*U scalar 64-bit compares;
// the CUDA kernel counts, one thread per unit), measured on a 2-core AMD EPYC (x86-64 baseline).
void select_units(int64_t U, int64_t n, Scratch& s, char* unit_kept) {
  uint64_t* keys = s.keys.data();
  for (int64_t u = 0; u < U; ++u) keys[u] = rank_key(s.units[u], static_cast<int>(u));
  if (n >= U) {
    std::fill(unit_kept, unit_kept + U, 1);
    return;
  }
  std::copy(keys, keys + U, s.sorted.begin());
  std::nth_element(s.sorted.begin(), s.sorted.begin() + (n - 1), s.sorted.begin() + U, std::greater<uint64_t>());
  const uint64_t last = s.sorted[n - 1];
  for (int64_t u = 0; u < U; ++u) unit_kept[u] = keys[u] >= last;
}

// Calls f(j, t) for the kept patches t in ascending order (j = 0, 1, ...) until f returns false.
template <typename F>
void for_each_kept(const char* unit_kept, const Geometry& g, F&& f) {
  int64_t j = 0;
  for (int64_t gr = 0; gr < g.Hg; ++gr) {
    const char* unit_row = unit_kept + (gr / g.block) * g.Wu;
    for (int64_t uc = 0, t = gr * g.Wg; uc < g.Wu; ++uc, t += g.block)
      if (unit_row[uc])
        for (int64_t i = 0; i < g.block; ++i)
          if (!f(j++, t + i)) return;
  }
}

// Bytes of a row's first kept source rows prefetched (into L2) before the next row's selection.
constexpr int64_t kPrefetchBytes = 48 * 1024;
constexpr int64_t kCacheLine = 64;
constexpr int64_t kMaxCopyBytes = 4096;

std::tuple<at::Tensor, at::Tensor> attentive_mask(
    const at::Tensor& x, const std::optional<at::Tensor>& scores, const std::optional<at::Tensor>& q,
    const std::optional<at::Tensor>& k, const std::optional<at::Tensor>& prior,
    const std::optional<at::Tensor>& boxes, int64_t num_prefix_tokens, at::IntArrayRef score_grid,
    at::IntArrayRef grid, int64_t block, int64_t num_units, double scale) {
  const MaskShape s = check_attentive_mask(x, scores, q, k, prior, boxes, num_prefix_tokens, score_grid, grid,
                                           block, num_units);
  const int64_t P = s.P, Bx = s.Bx, D = s.D, U = s.U, Bs = s.Bs, kept_patches = s.M;
  Geometry g{s.Hs, s.Ws, s.Hg, s.Wg, block, s.Hu, s.Wu, false};
  at::Tensor map = scores.has_value() ? float_contiguous(*scores)
                                      : cls_attention(*q, *k, P, scale, prior).to(at::kFloat);
  at::Tensor box = boxes.has_value() ? float_contiguous(*boxes) : at::Tensor();
  g.resample = box.defined() || g.Hs != g.Hg || g.Ws != g.Wg;

  at::Tensor kept = at::empty({Bx, P + kept_patches, D}, x.options());
  at::Tensor idx = at::empty({Bx, kept_patches}, x.options().dtype(at::kLong));
  const float* map_p = map.const_data_ptr<float>();
  const float* box_p = box.defined() ? box.const_data_ptr<float>() : nullptr;
  const char* x_p = static_cast<const char*>(x.const_data_ptr());
  char* kept_p = static_cast<char*>(kept.mutable_data_ptr());
  int64_t* idx_p = idx.mutable_data_ptr<int64_t>();
  const int64_t es = x.element_size(), xs0 = x.stride(0), xs1 = x.stride(1), xs2 = x.stride(2);
  const int64_t row_bytes = D * es;
  const bool packed = xs2 == 1 && xs1 == D;  // a view's tokens are one block of memory
  const int64_t rows_per_copy = packed ? std::max<int64_t>(1, kMaxCopyBytes / std::max<int64_t>(row_bytes, 1)) : 1;

  const int64_t prefetch_rows = xs2 == 1 ? kPrefetchBytes / std::max<int64_t>(row_bytes, 1) : 0;
  at::parallel_for(0, Bx, 1, [&](int64_t begin, int64_t end) {
    Scratch scratch(g);
    std::vector<char> kept_now(U), kept_next(U);
    auto select = [&](int64_t r, char* unit_kept) {
      unit_scores(map_p + (r % Bs) * g.Hs * g.Ws, box_p ? box_p + 4 * r : nullptr, g, scratch);
      select_units(U, num_units, scratch, unit_kept);
    };
    select(begin, kept_now.data());
    for (int64_t r = begin; r < end; ++r) {
      const char* src = x_p + r * xs0 * es;
      if (prefetch_rows > 0)
        for_each_kept(kept_now.data(), g, [&](int64_t j, int64_t t) {
          const char* row = src + (P + t) * xs1 * es;
          for (int64_t b = 0; b < row_bytes; b += kCacheLine) __builtin_prefetch(row + b, 0, 2);
          return j + 1 < prefetch_rows;
        });
      if (r + 1 < end) select(r + 1, kept_next.data());
      char* dst = kept_p + r * (P + kept_patches) * row_bytes;
      int64_t* row_idx = idx_p + r * kept_patches;
      // Adjacent source rows (the prefix, then runs of kept patches) of a packed x go out in one
      // memcpy of up to kMaxCopyBytes: fewer calls for narrow rows, while larger copies stay on
      // glibc's vector loop (its rep-movsb path above 4-8 KB was 3-7% slower here, AMD EPYC).
      int64_t run_dst = 0, run_src = 0, run_len = P;
      auto flush = [&] {
        for (int64_t done = 0; done < run_len; done += rows_per_copy)
          copy_row(dst + (run_dst + done) * row_bytes, src + (run_src + done) * xs1 * es,
                   std::min(rows_per_copy, run_len - done) * D, xs2, es);
      };
      for_each_kept(kept_now.data(), g, [&](int64_t j, int64_t t) {
        row_idx[j] = t;
        if (run_src + run_len == P + t) {
          ++run_len;
        } else {
          flush();
          run_dst = P + j, run_src = P + t, run_len = 1;
        }
        return true;
      });
      flush();
      std::swap(kept_now, kept_next);
    }
  });
  return {kept, idx};
}

at::Tensor attentive_mask_backward(const at::Tensor& grad_kept_in, const at::Tensor& idx_in,
                                   int64_t num_prefix_tokens, int64_t num_patches) {
  check_attentive_mask_backward(grad_kept_in, idx_in, num_prefix_tokens, num_patches);
  const at::Tensor grad_kept = grad_kept_in.contiguous();
  const at::Tensor idx = idx_in.contiguous();
  const int64_t Bx = grad_kept.size(0), D = grad_kept.size(2), P = num_prefix_tokens, M = idx.size(1);
  const int64_t T = P + num_patches, row_bytes = D * grad_kept.element_size();
  at::Tensor grad_x = at::empty({Bx, T, D}, grad_kept.options());
  const char* g_p = static_cast<const char*>(grad_kept.const_data_ptr());
  const int64_t* idx_p = idx.const_data_ptr<int64_t>();
  char* out_p = static_cast<char*>(grad_x.mutable_data_ptr());
  at::parallel_for(0, Bx, 1, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const char* src = g_p + r * (P + M) * row_bytes;
      char* dst = out_p + r * T * row_bytes;
      const int64_t* row_idx = idx_p + r * M;
      std::memcpy(dst, src, P * row_bytes);
      int64_t j = 0;
      for (int64_t t = 0; t < num_patches; ++t) {
        char* out_row = dst + (P + t) * row_bytes;
        if (j < M && row_idx[j] == t) {
          std::memcpy(out_row, src + (P + j) * row_bytes, row_bytes);
          ++j;
        } else {
          std::memset(out_row, 0, row_bytes);
        }
      }
    }
  });
  return grad_x;
}

}  // namespace

TORCH_LIBRARY_IMPL(aclip_kernels, CPU, m) {
  m.impl("attentive_mask", &attentive_mask);
  m.impl("attentive_mask_backward", &attentive_mask_backward);
}

}  // namespace aclip::cpu

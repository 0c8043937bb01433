// attentive_mask on the CPU: per output row (view), align the image's scores to the view's box,
// pool b x b blocks, select the top units with nth_element, expand them to ascending patch
// positions and copy the prefix and kept rows; the backward writes each row of grad_x once.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <numeric>
#include <vector>

#include "../checks.h"
#include "../mask_math.h"
#include "kernels.h"

namespace aclip::cpu {
namespace {

// Copies one token row of `width` elements of `elsize` bytes; src elements `src_stride` apart.
inline void copy_row(char* dst, const char* src, int64_t width, int64_t src_stride, int64_t elsize) {
  if (src_stride == 1) {
    std::memcpy(dst, src, width * elsize);
    return;
  }
  for (int64_t d = 0; d < width; ++d) std::memcpy(dst + d * elsize, src + d * src_stride * elsize, elsize);
}

struct Geometry {
  int64_t Hs, Ws, Hg, Wg, block, Hu, Wu;
  bool resample;
};

// Scores of every unit of one row: align (if needed), then block means. `cells` is scratch [Hg*Wg].
void unit_scores(const float* map, const float* box, const Geometry& g, float* cells, float* units) {
  const int64_t N = g.Hg * g.Wg;
  if (g.resample) {
    const float y0 = box ? box[0] : 0.f, x0 = box ? box[1] : 0.f;
    const float h = box ? box[2] : 1.f, w = box ? box[3] : 1.f;
    for (int64_t r = 0; r < g.Hg; ++r) {
      const SampleCoord ys = sample_coord(y0, h, r, g.Hg, g.Hs);
      for (int64_t c = 0; c < g.Wg; ++c)
        cells[r * g.Wg + c] = bilinear(map, g.Ws, ys, sample_coord(x0, w, c, g.Wg, g.Ws));
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

std::tuple<at::Tensor, at::Tensor> attentive_mask(
    const at::Tensor& x, const std::optional<at::Tensor>& scores, const std::optional<at::Tensor>& q,
    const std::optional<at::Tensor>& k, const std::optional<at::Tensor>& prior,
    const std::optional<at::Tensor>& boxes, int64_t num_prefix_tokens, at::IntArrayRef score_grid,
    at::IntArrayRef grid, int64_t block, int64_t num_units, double scale) {
  const MaskShape s = check_attentive_mask(x, scores, q, k, prior, boxes, num_prefix_tokens, score_grid, grid,
                                           block, num_units);
  const int64_t P = s.P, Bx = s.Bx, D = s.D, N = s.N, U = s.U, Bs = s.Bs, kept_patches = s.M;
  Geometry g{s.Hs, s.Ws, s.Hg, s.Wg, block, s.Hu, s.Wu, false};
  at::Tensor map = scores.has_value() ? scores->to(at::kFloat).contiguous()
                                      : cls_attention(*q, *k, P, scale, prior).to(at::kFloat);
  at::Tensor box = boxes.has_value() ? boxes->to(at::kFloat).contiguous() : at::Tensor();
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

  at::parallel_for(0, Bx, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> cells(N), units(U);
    std::vector<int> order(U);
    std::vector<char> keep(N);
    for (int64_t r = begin; r < end; ++r) {
      unit_scores(map_p + (r % Bs) * g.Hs * g.Ws, box_p ? box_p + 4 * r : nullptr, g, cells.data(), units.data());
      std::iota(order.begin(), order.end(), 0);
      const float* s = units.data();
      auto better = [s](int a, int b) { return ranks_before(s[a], a, s[b], b); };
      if (num_units < U) std::nth_element(order.begin(), order.begin() + num_units, order.end(), better);

      std::fill(keep.begin(), keep.end(), 0);
      for (int64_t i = 0; i < num_units; ++i) {
        const int64_t ur = order[i] / g.Wu, uc = order[i] % g.Wu;
        for (int64_t bi = 0; bi < block; ++bi)
          for (int64_t bj = 0; bj < block; ++bj) keep[(ur * block + bi) * g.Wg + uc * block + bj] = 1;
      }
      const char* src = x_p + r * xs0 * es;
      char* dst = kept_p + r * (P + kept_patches) * row_bytes;
      int64_t* row_idx = idx_p + r * kept_patches;
      for (int64_t t = 0; t < P; ++t) copy_row(dst + t * row_bytes, src + t * xs1 * es, D, xs2, es);
      int64_t j = 0;
      for (int64_t t = 0; t < N; ++t) {
        if (!keep[t]) continue;
        row_idx[j] = t;
        copy_row(dst + (P + j) * row_bytes, src + (P + t) * xs1 * es, D, xs2, es);
        ++j;
      }
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

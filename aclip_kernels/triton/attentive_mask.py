"""attentive_mask in Triton: the forward (one program per output row, views in parallel; with
fused q/k the score map is computed first by the scoring kernel, ``launch_cls_scores`` in
cls_attention.py, as the CUDA backend runs cls_attention and then its mask kernel) and the one-pass
backward.

Forward, per output row r (view v of image i = r % Bs):
  1. the score map of image i: row i of ``scores`` [Bs, Hs*Ws], given or computed from q/k
     (+ prior) by the scoring launch into a [Bs, Hs*Ws] buffer (float32; float64 for float64 q);
  2./3. the score of each b x b unit: its cells sampled bilinearly in the view's box (when boxes
     are given or the grids differ), summed row-major and divided by b*b, each float32 operation
     rounded as in ``aclip_kernels.reference`` (explicit ``.rn`` PTX on CUDA: no FMA contraction,
     no flushed denormals);
  4. the top n units: a bitwise search for the n-th largest monotone integer key (NaN lowest),
     then ties at that key go to the lower unit indices (a prefix count in unit order);
  5. ascending patch positions from per-unit-row counts, written to ``idx``;
  6. the prefix rows and the kept rows of x copied into ``kept`` in [rows, D] tiles.
Backward: grad_x row t is grad_kept's prefix row, the grad_kept row whose idx equals t (binary
search in the ascending idx row) or zero, each row of grad_x written once.

Launch: the grid, scalars and constexprs of a forward launch are cached per (shapes, flags)
(``_forward_plan``); the public path checks its arguments once (``call_checked``), a direct call of
the registered op is checked by the op. All offsets are int64 products.

Selection, decided from the compile facts (benchmarks/results/compile_facts.md): the bitwise
search stays. Its loop body holds 8 barriers (sm_80/sm_90, static count; 32 runtime steps).
Rank by counting for <= 64 padded units (a unit is kept when fewer than n units beat it: a higher
int32 key, or the same key at a lower index; one [U, U] comparison and one reduction, padding
masked; units flattened with ``tl.reshape``) was built twice. The first time, inside the fused
kernel, A-CLIP's ViT-B/16 variant (bf16, b=2, boxes, D=768: 7x7 units padded to 64) took 255
registers with 40-88 bytes of spills on sm_80/sm_90 and 205 spilled VGPRs on gfx942. Retried once
the scoring phase had left this kernel (first config, 4 warps; it passed the interpreter tests):
that variant still spills, 40 / 88 bytes on sm_80 / sm_90 and 207 VGPRs on gfx942 under Triton
3.8, 88 / 112 bytes on sm_80 / sm_90 under Triton 3.6 (gfx942: 364 VGPRs, no spill); at 8x8 units
(b=1, 64 units) float32 and bf16 spill 8 VGPRs on gfx942 under Triton 3.8; at 16 units (8x8 with
b=2) it fits everywhere but gains nothing: there the search stays within one warp (0 selection
barriers) and the counting takes 1. So it was left out again. Triton gives no
shared-memory scratch to stream the [U, U] comparison in chunks. The other way, written down for
later: two kernels, a tiny selection kernel (one program per row, idx only) and an xFormers-style
2-D gather over (index tiles x D tiles), which overlaps the copy of one row with the selection of
others and lets the copy keep several tiles in flight (here a store to ``kept`` may alias the next
load from ``x``).

Fused scoring (issue #14 item 3), built in the style of flash-decoding: a separate scoring launch
(cls_attention.py's docstring has the design) of one program per (image, head group) loads k in
[BLOCK_T, heads, Dh] tiles, keeps the logits on chip with an online max and sum, and splits an
image's heads over G programs when the images are too few to fill the GPU; then this kernel does
one selection per output row. Before, one program per image ran its heads one after another
(dependent k-tile loads, a logits round trip and 2 barriers per head), then each view serially.

Bandwidth model of the fused forward, ViT-B/16 bf16 (H=12, Dh=64, T=197, N=196), an ESTIMATE (no
GPU measured it): the scoring reads k once, 12*197*64*2 = 303 KB per image (contiguous 1.5 KB per
token in timm's packed qkv), plus q (1.5 KB), a logits scratch written and read once (2*12*196*4 =
19 KB, L2-resident) and the [N] map (0.8 KB); the mask kernel then reads the map and copies the
kept rows. Programs on an H200 (132 SMs): B=256: G=1, 256 scoring programs (1.9 per SM, 8 warps),
each with two 12 KB tiles of k in flight (the tile in use and the next, prefetched), ~46 KB per
SM, against the ~36 KB per SM that Little's law asks for at 4.8 TB/s and ~1 us of loaded latency;
78 MB of k: about 16 us at the peak, about 20 us at 80% of it (estimate); B=64: G=3 (4 heads per
group, no padded head lanes), 192 programs; B=8: G=12 (one head per group), 96 programs, latency-bound
(2.4 MB of k, a few microseconds). G>1 adds the combine launch (G*N*4 bytes per image). Mask
kernel: B*V programs (512 at B=256x2).

Autotuning: keyed on what changes the best config, not on (N, D) alone: the row count bucketed to
a power of two (``rows_bucket``: a small eval batch and B=512 fill the GPU differently), the block
size and boxes (the selection's share of a program), and the dtypes (the autotuner adds them);
fused q/k or not no longer changes this kernel. Heuristics in the style of Liger (a config computed
from D and the row count) would skip the first-call benchmark, but need GPU timings to fit; with
none measured yet, autotuning stays here, keyed properly (the scoring kernel uses heuristic tiles).
"""
from __future__ import annotations

import functools
from typing import List, Optional, Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._common import (autotune, cached, dummy, fadd, fmul, fsub, launch_options, next_pow2, use_rn, vector_width,
                      wrap_triton)
from .cls_attention import launch_cls_scores

__all__ = ["launch_attentive_mask", "launch_attentive_mask_backward", "forward_launch"]


@triton.jit
def _sample_coord(cell, cells_f, size, size_f, origin, extent, RN: tl.constexpr):
    """Where online cell ``cell`` (of ``cells_f``) samples an axis of ``size`` pixels:
    (lo, hi, frac), as ``align_scores_ref``'s sample_coords."""
    centre = tl.math.div_rn(cell.to(tl.float32) + 0.5, cells_f)
    pos = fadd(origin, fmul(centre, extent, RN), RN)
    pix = fsub(fmul(pos, size_f, RN), tl.full((), 0.5, tl.float32), RN)
    pix = tl.minimum(tl.maximum(pix, 0.0), size_f - 1.0)
    lo = tl.floor(pix)
    frac = fsub(pix, lo, RN)
    lo_i = lo.to(tl.int32)
    return lo_i, tl.minimum(lo_i + 1, size - 1), frac


@triton.jit
def _cell_scores(map_row, sm1, rows, cols, mask, Hs, Ws, Hs_f, Ws_f, Hg_f, Wg_f, y0, x0, bh, bw,
                 RESAMPLE: tl.constexpr, RN: tl.constexpr):
    """float32 scores of the online cells (rows [R, 1], cols [1, C]) from the map [Hs*Ws]."""
    if RESAMPLE:
        ylo, yhi, wy = _sample_coord(rows, Hg_f, Hs, Hs_f, y0, bh, RN)
        xlo, xhi, wx = _sample_coord(cols, Wg_f, Ws, Ws_f, x0, bw, RN)
        ylo = ylo.to(tl.int64) * Ws
        yhi = yhi.to(tl.int64) * Ws
        v00 = tl.load(map_row + (ylo + xlo) * sm1, mask=mask, other=0.0).to(tl.float32)
        v01 = tl.load(map_row + (ylo + xhi) * sm1, mask=mask, other=0.0).to(tl.float32)
        v10 = tl.load(map_row + (yhi + xlo) * sm1, mask=mask, other=0.0).to(tl.float32)
        v11 = tl.load(map_row + (yhi + xhi) * sm1, mask=mask, other=0.0).to(tl.float32)
        one = tl.full((), 1.0, tl.float32)
        one_wx = fsub(one, wx, RN)
        one_wy = fsub(one, wy, RN)
        top = fadd(fmul(v00, one_wx, RN), fmul(v01, wx, RN), RN)
        bottom = fadd(fmul(v10, one_wx, RN), fmul(v11, wx, RN), RN)
        return fadd(fmul(top, one_wy, RN), fmul(bottom, wy, RN), RN)
    else:
        return tl.load(map_row + (rows.to(tl.int64) * Ws + cols) * sm1, mask=mask, other=0.0).to(tl.float32)


@triton.jit
def _select_and_gather(x_row, kept_row, idx_row, map_row, box_row, sm1, sx1, sx2,
                       P, D, Hs, Ws, Hs_f, Ws_f, Hg_f, Wg_f, Wg, Hu, Wu, M, n_units,
                       BLOCK: tl.constexpr, RESAMPLE: tl.constexpr, HAS_BOXES: tl.constexpr,
                       BLOCK_HU: tl.constexpr, BLOCK_WU: tl.constexpr,
                       COPY_ROWS: tl.constexpr, BLOCK_D: tl.constexpr, RN: tl.constexpr):
    """Steps 2-6 of the forward for one output row."""
    if HAS_BOXES:
        y0 = tl.load(box_row)
        x0 = tl.load(box_row + 1)
        bh = tl.load(box_row + 2)
        bw = tl.load(box_row + 3)
    else:
        y0 = tl.full((), 0.0, tl.float32)
        x0 = tl.full((), 0.0, tl.float32)
        bh = tl.full((), 1.0, tl.float32)
        bw = tl.full((), 1.0, tl.float32)
    ur = tl.arange(0, BLOCK_HU)[:, None]
    uc = tl.arange(0, BLOCK_WU)[None, :]
    umask = (ur < Hu) & (uc < Wu)

    # Unit scores: the cells of each unit summed in row-major order, then divided by b*b.
    for bi in tl.static_range(BLOCK):
        for bj in tl.static_range(BLOCK):
            cell = _cell_scores(map_row, sm1, ur * BLOCK + bi, uc * BLOCK + bj, umask, Hs, Ws,
                                Hs_f, Ws_f, Hg_f, Wg_f, y0, x0, bh, bw, RESAMPLE, RN)
            if bi == 0 and bj == 0:
                total = cell
            else:
                total = fadd(total, cell, RN)
    if BLOCK > 1:
        score = tl.math.div_rn(total, BLOCK * BLOCK * 1.0)
    else:
        score = total

    # Monotone keys in [0, 2**32): higher score = larger key, -0.0 = +0.0, NaN = 0 (below -inf);
    # padding lanes -1.
    score = tl.where(score == 0.0, 0.0, score)
    bits = score.to(tl.int32, bitcast=True)
    key = bits ^ ((bits >> 31) & 0x7FFFFFFF)
    key = tl.where(score != score, -2147483648, key)
    ukey = tl.where(umask, key.to(tl.int64) + 2147483648, -1)

    # The n-th largest key, bit by bit: the largest th with at least n keys >= th.
    # (Runtime loops here and in the backward: unrolled, these chains would make torch.compile's
    # mutation analysis, which walks every path of the kernel's dataflow graph, take 2**steps.)
    th = tl.full((), 0, tl.int64)
    for step in range(32):
        cand = th | (tl.full((), 1, tl.int64) << (31 - step))
        count = tl.sum(tl.sum((ukey >= cand).to(tl.int32), axis=1), axis=0)
        th = tl.where(count >= n_units, cand, th)
    above = ukey > th
    need = n_units - tl.sum(tl.sum(above.to(tl.int32), axis=1), axis=0)
    tie = (ukey == th).to(tl.int32)
    tie_rows = tl.sum(tie, axis=1)
    tie_rank = (tl.cumsum(tie_rows, axis=0) - tie_rows)[:, None] + tl.cumsum(tie, axis=1)
    kept = above | ((tie != 0) & (tie_rank <= need))

    # Ascending patch positions: the kept patches in earlier unit rows (b*b per kept unit), in
    # earlier patch rows of this unit row (b per kept unit), left of this unit, left in this unit.
    k_i = kept.to(tl.int32)
    row_count = tl.sum(k_i, axis=1)
    rows_before = (tl.cumsum(row_count, axis=0) - row_count)[:, None]
    row_count = row_count[:, None]
    left = tl.cumsum(k_i, axis=1) - k_i
    for bi in tl.static_range(BLOCK):
        for bj in tl.static_range(BLOCK):
            pos = BLOCK * BLOCK * rows_before + BLOCK * bi * row_count + BLOCK * left + bj
            patch = (ur * BLOCK + bi) * Wg + uc * BLOCK + bj
            tl.store(idx_row + pos, patch.to(tl.int64), mask=kept)
    tl.debug_barrier()  # idx is read back below by other threads

    # kept = [x prefix rows, x rows P + idx], in [COPY_ROWS, BLOCK_D] tiles.
    rows_out = P + M
    rows_x = P + (Hu * BLOCK) * Wg
    for j0 in range(0, rows_out, COPY_ROWS):
        j = j0 + tl.arange(0, COPY_ROWS)
        jmask = j < rows_out
        is_patch = j >= P
        pos_in_x = tl.load(idx_row + (j - P), mask=jmask & is_patch, other=0) + P
        src = tl.where(is_patch, pos_in_x, j).to(tl.int64)
        src_ok = jmask & (src >= 0) & (src < rows_x)  # never read outside x, even from a corrupt idx
        dst = j.to(tl.int64) * D
        for d0 in range(0, D, BLOCK_D):
            offs_d = d0 + tl.arange(0, BLOCK_D)
            m2 = jmask[:, None] & (offs_d < D)[None, :]
            vals = tl.load(x_row + src[:, None] * sx1 + offs_d.to(tl.int64)[None, :] * sx2,
                           mask=src_ok[:, None] & m2, other=0)
            tl.store(kept_row + dst[:, None] + offs_d[None, :], vals, mask=m2)


_FWD_CONFIGS = [triton.Config({"COPY_ROWS": r, "BLOCK_D": d}, num_warps=w)
                for r, d, w in ((32, 256, 4), (8, 256, 4), (16, 128, 4), (16, 256, 8), (8, 512, 8),
                                (32, 128, 8))]


@autotune(_FWD_CONFIGS, key=["N", "D", "rows_bucket", "BLOCK", "HAS_BOXES"])
@triton.jit(do_not_specialize=["n_units", "rows_bucket"])
def _mask_fwd_kernel(x, kept, idx, scores, boxes, Bs, P, N, D, M, n_units,
                     Hs, Ws, Hs_f, Ws_f, Hg_f, Wg_f, Wg, Hu, Wu,
                     sx0, sx1, sx2, ss0, ss1, rows_bucket,
                     BLOCK: tl.constexpr, RESAMPLE: tl.constexpr, HAS_BOXES: tl.constexpr,
                     BLOCK_HU: tl.constexpr, BLOCK_WU: tl.constexpr, RN: tl.constexpr, VEC: tl.constexpr,
                     COPY_ROWS: tl.constexpr, BLOCK_D: tl.constexpr):
    """Grid (Bx,): output row r (view r // Bs of image r % Bs). ``rows_bucket`` (Bx rounded up to
    a power of two) is read only by the autotuner's key."""
    if VEC > 1:  # VEC divides D and x's row strides: lets the row copies vectorise
        D = (D // VEC) * VEC
        sx0 = (sx0 // VEC) * VEC
        sx1 = (sx1 // VEC) * VEC
    r = tl.program_id(0).to(tl.int64)
    map_row = scores + (r % Bs) * ss0
    _select_and_gather(x + r * sx0, kept + r * (P + M) * D, idx + r * M, map_row, boxes + r * 4,
                       ss1, sx1, sx2, P, D, Hs, Ws, Hs_f, Ws_f, Hg_f, Wg_f, Wg, Hu, Wu, M, n_units,
                       BLOCK, RESAMPLE, HAS_BOXES, BLOCK_HU, BLOCK_WU, COPY_ROWS, BLOCK_D, RN)


_BWD_CONFIGS = [triton.Config({"BLOCK_T": t, "BLOCK_D": d}, num_warps=w)
                for t, d, w in ((32, 256, 4), (8, 256, 4), (16, 128, 4), (16, 256, 8), (8, 512, 8))]


@autotune(_BWD_CONFIGS, key=["N", "D", "M", "rows_bucket"])
@triton.jit(do_not_specialize=["rows_bucket"])
def _mask_bwd_kernel(grad_kept, idx, grad_x, P, N, D, M, sg0, sg1, sg2, search_steps, rows_bucket,
                     VEC: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
    """Grid (Bx, cdiv(P + N, BLOCK_T)): rows [BLOCK_T * pid1, ...) of grad_x [Bx, P+N, D]."""
    if VEC > 1:  # VEC divides D and grad_kept's row strides: lets the row copies vectorise
        D = (D // VEC) * VEC
        sg0 = (sg0 // VEC) * VEC
        sg1 = (sg1 // VEC) * VEC
    r = tl.program_id(0).to(tl.int64)
    t = tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T)
    tmask = t < P + N
    patch = t - P
    idx_row = idx + r * M
    lo = tl.zeros([BLOCK_T], dtype=tl.int32)
    hi = tl.full([BLOCK_T], M, tl.int32)
    for _ in range(search_steps):  # lo = first j with idx[j] >= patch (a runtime loop, see above)
        active = lo < hi
        mid = (lo + hi) // 2
        value = tl.load(idx_row + mid, mask=active & tmask, other=0)
        right = value < patch
        lo = tl.where(active & right, mid + 1, lo)
        hi = tl.where(active & (~right), mid, hi)
    found = tl.load(idx_row + lo, mask=tmask & (lo < M), other=-1) == patch
    is_prefix = t < P
    src = tl.where(is_prefix, t, P + lo).to(tl.int64)
    take = tmask & (is_prefix | found)
    src_row = grad_kept + r * sg0 + src * sg1
    dst_row = grad_x + (r * (P + N) + t.to(tl.int64)) * D
    for d0 in range(0, D, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        dmask = (offs_d < D)[None, :]
        vals = tl.load(src_row[:, None] + offs_d.to(tl.int64)[None, :] * sg2, mask=take[:, None] & dmask,
                       other=0.0)
        tl.store(dst_row[:, None] + offs_d[None, :], vals, mask=tmask[:, None] & dmask)


@functools.lru_cache(maxsize=512)
def _forward_plan(bx: int, d: int, p: int, score_grid: Tuple[int, int], grid: Tuple[int, int], block: int,
                  num_units: int, bs: int, has_boxes: bool, rn: bool, vec: int):
    """What a ``_mask_fwd_kernel`` launch needs besides tensors and strides, computed once per
    (shapes, flags): (the scalar arguments after the tensors, rows_bucket, constexprs)."""
    hs, ws = score_grid
    hg, wg = grid
    scalars = (bs, p, hg * wg, d, num_units * block * block, num_units,
               hs, ws, float(hs), float(ws), float(hg), float(wg), wg, hg // block, wg // block)
    constexprs = dict(BLOCK=block, RESAMPLE=has_boxes or score_grid != grid, HAS_BOXES=has_boxes,
                      BLOCK_HU=next_pow2(hg // block), BLOCK_WU=next_pow2(wg // block), RN=rn, VEC=vec)
    return scalars, next_pow2(bx), constexprs


def forward_launch(x: Tensor, scores: Optional[Tensor], q: Optional[Tensor], k: Optional[Tensor],
                   prior: Optional[Tensor], boxes: Optional[Tensor], num_prefix_tokens: int,
                   score_grid, grid, block: int, num_units: int, scale: float):
    """(outputs (kept, idx), grid, runtime args, constexprs) of one ``_mask_fwd_kernel`` launch,
    for checked arguments; with q/k (no ``scores``) the score map [Bs, N] is computed first, by
    ``launch_cls_scores`` (+ prior)."""
    p = num_prefix_tokens
    bx, _, d = x.shape
    m = num_units * block * block
    kept = x.new_empty(bx, p + m, d)
    idx = x.new_empty(bx, m, dtype=torch.int64)
    if scores is None:
        scores = launch_cls_scores(q, k, prior, p, scale)
    key = (bx, d, p, tuple(score_grid), tuple(grid), block, num_units, scores.shape[0], boxes is not None,
           use_rn(x.device), vector_width(x))
    scalars, rows_bucket, constexprs = cached(_forward_plan, *key)
    runtime = (x, kept, idx, scores, dummy(x, boxes), *scalars, *x.stride(), *scores.stride(), rows_bucket)
    return (kept, idx), (bx,), runtime, dict(constexprs)


def launch_attentive_mask(x: Tensor, scores: Optional[Tensor], q: Optional[Tensor], k: Optional[Tensor],
                          prior: Optional[Tensor], boxes: Optional[Tensor], num_prefix_tokens: int,
                          score_grid: List[int], grid: List[int], block: int, num_units: int,
                          scale: float) -> Tuple[Tensor, Tensor]:
    """The forward behind ``aclip_kernels::attentive_mask_triton`` (aclip_kernels/ops/attentive_mask.py,
    which checks the arguments) -> (kept [Bx, P + n*b*b, D], idx [Bx, n*b*b] int64 ascending)."""
    outputs, launch_grid, runtime, constexprs = forward_launch(
        x, scores, q, k, prior, boxes, num_prefix_tokens, score_grid, grid, block, num_units, scale)
    wrap_triton(_mask_fwd_kernel)[launch_grid](*runtime, **constexprs, **launch_options(x.device))
    return outputs


def search_steps(num_kept: int) -> int:
    return max(1, int(num_kept).bit_length())


def backward_args(grad_kept: Tensor, idx: Tensor, grad_x: Tensor, num_prefix_tokens: int,
                  num_patches: int) -> tuple:
    """The runtime arguments of ``_mask_bwd_kernel`` (also used by the compile check)."""
    m = idx.shape[1]
    return (grad_kept, idx, grad_x, num_prefix_tokens, num_patches, grad_kept.shape[2], m, *grad_kept.stride(),
            search_steps(m), next_pow2(grad_kept.shape[0]))


def launch_attentive_mask_backward(grad_kept: Tensor, idx: Tensor, num_prefix_tokens: int,
                                   num_patches: int) -> Tensor:
    """grad_kept [Bx, P+n, D], idx [Bx, n] (checked) -> grad_x [Bx, P+N, D] (zero where not kept): the
    backward behind ``aclip_kernels::attentive_mask_backward_triton``."""
    bx, _, d = grad_kept.shape
    p = num_prefix_tokens
    idx = idx.contiguous()
    grad_x = grad_kept.new_empty(bx, p + num_patches, d)
    wrap_triton(_mask_bwd_kernel)[lambda meta: (bx, triton.cdiv(p + num_patches, meta["BLOCK_T"]))](
        *backward_args(grad_kept, idx, grad_x, p, num_patches), VEC=vector_width(grad_kept))
    return grad_x

"""Pure-PyTorch reference of every op: the definition of the semantics.

Every kernel (C++, CUDA, Triton) is tested against these functions. They are written to be read,
not to be fast; each step is one of the numbered steps of ``attentive_mask`` in docs/design.md,
section 4, and the floating-point order of every step that feeds the selection (alignment, block
pooling) is spelled out, because kernels must reproduce it bit for bit to select the same patches.

Shapes: B batch, P prefix tokens, N patch tokens, D width, H heads, Dh head dim, T = P + N,
V views per image (x rows are view-major: row ``v * Bs + i`` is view ``v`` of image ``i``),
U selection units (patches, or b x b blocks of them).
"""
from __future__ import annotations

import numbers
from typing import Optional, Tuple

import torch
from torch import Tensor

__all__ = [
    "cls_attention_ref",
    "cls_attention_backward_ref",
    "align_scores_ref",
    "pool_blocks_ref",
    "rank_units_ref",
    "select_patches_ref",
    "gather_tokens_ref",
    "scatter_tokens_ref",
    "attentive_mask_ref",
    "num_keep_units",
]


def num_keep_units(keep, num_units: int) -> int:
    """The number of units kept: an integer (Python or numpy) is a count, any other real number in
    (0, 1] a fraction of ``num_units``."""
    if isinstance(keep, numbers.Integral):
        return int(keep)
    return max(1, min(num_units, int(float(keep) * num_units + 0.5)))


def cls_attention_ref(q: Tensor, k: Tensor, num_prefix_tokens: int = 1,
                      scale: Optional[float] = None) -> Tensor:
    """[CLS] attention to each patch, averaged over heads.

    q [B, H, Dh], k [B, H, T, Dh] -> [B, N] (float32; float64 for float64 inputs):
    ``mean_h softmax_t(q[b,h] . k[b,h,t] * scale)[P:]``, the softmax over all T keys.
    """
    if scale is None:
        scale = q.shape[-1] ** -0.5
    dtype = torch.promote_types(q.dtype, torch.float32)
    logits = torch.einsum("bhd,bhtd->bht", q.to(dtype), k.to(dtype)) * scale
    return logits.softmax(dim=-1)[:, :, num_prefix_tokens:].mean(dim=1)


def mean_query_attention_ref(attn: Tensor, num_prefix_tokens: int = 0) -> Tensor:
    """The [CLS]-free "mean-query" score of one layer from its attention map.

    attn [B, H, T, T] (softmax rows) -> [B, N] float32: ``mean_h softmax_t(mean_s log attn[b,h,s,t])[P:]``.
    This is the attention row of the token-mean query q_mean = mean_s q_s: its logits q_mean . k_t are
    the row mean of the logits, and log attn[s, t] differs from the logits only by a per-row constant,
    which cancels in the softmax. So the rule is the renormalised geometric mean of all the rows.
    """
    dtype = torch.promote_types(attn.dtype, torch.float32)
    return attn.to(dtype).log().mean(dim=2).softmax(dim=-1)[:, :, num_prefix_tokens:].mean(dim=1)


def align_scores_ref(score_map: Tensor, boxes: Optional[Tensor], grid: Tuple[int, int]) -> Tensor:
    """Resample each view's score map onto the online grid.

    score_map [Bx, Hs, Ws] float32 (already repeated per view), boxes [Bx, 4] (y0, x0, h, w) in the
    score map's normalised frame or None -> [Bx, Hg, Wg] float32.

    Without boxes and with equal grids the map is returned as it is. Otherwise (box (0, 0, 1, 1)
    when none is given) online cell (r, c) samples the map bilinearly at its pixel centre,
    clamped to the border, which equals
    ``F.grid_sample(map, 2 * xy - 1, mode="bilinear", padding_mode="border", align_corners=False)``.
    Every line below is one float32 operation, rounded before the next; kernels do the same.
    """
    bx, hs, ws = score_map.shape
    hg, wg = grid
    if boxes is None and (hs, ws) == (hg, wg):
        return score_map
    if boxes is None:
        boxes = score_map.new_tensor([0.0, 0.0, 1.0, 1.0]).expand(bx, 4)
    boxes = boxes.to(torch.float32)
    y0, x0, h, w = (boxes[:, i, None] for i in range(4))

    def sample_coords(origin, extent, cells, size):
        centre = (torch.arange(cells, dtype=torch.float32, device=score_map.device) + 0.5) / cells
        pos = origin + centre * extent                       # normalised position in the map
        pix = (pos * size - 0.5).clamp(0.0, size - 1.0)      # pixel coordinate, border clamp
        lo = pix.floor()
        frac = pix - lo
        lo = lo.long()
        hi = (lo + 1).clamp(max=size - 1)
        return lo, hi, frac

    ylo, yhi, wy = sample_coords(y0, h, hg, hs)             # each [Bx, Hg]
    xlo, xhi, wx = sample_coords(x0, w, wg, ws)             # each [Bx, Wg]
    rows = torch.arange(bx, device=score_map.device)[:, None, None]

    def at(yi, xi):
        return score_map[rows, yi[:, :, None], xi[:, None, :]]

    wy, wx = wy[:, :, None], wx[:, None, :]
    top = at(ylo, xlo) * (1.0 - wx) + at(ylo, xhi) * wx
    bottom = at(yhi, xlo) * (1.0 - wx) + at(yhi, xhi) * wx
    return top * (1.0 - wy) + bottom * wy


def pool_blocks_ref(cell_scores: Tensor, block: int) -> Tensor:
    """Mean of each b x b block: [Bx, Hg, Wg] -> [Bx, Hg/b, Wg/b].

    The cells are summed in row-major order inside the block, then divided by b*b.
    """
    if block == 1:
        return cell_scores
    bx, hg, wg = cell_scores.shape
    cells = cell_scores.view(bx, hg // block, block, wg // block, block)
    total = cells[:, :, 0, :, 0]
    for i in range(block):
        for j in range(block):
            if i or j:
                total = total + cells[:, :, i, :, j]
    return total / (block * block)


def rank_units_ref(unit_scores: Tensor) -> Tensor:
    """Unit indices best first: [Bx, U] -> [Bx, U] int64.

    Higher score first; equal scores in ascending index order; NaN after every number.
    """
    nan = unit_scores.isnan()
    order = torch.argsort(unit_scores.masked_fill(nan, float("-inf")), dim=-1,
                          descending=True, stable=True)
    # A second stable pass moves the NaN units behind the -inf ones and keeps every other order.
    nan_last = torch.argsort(nan.gather(-1, order).to(torch.uint8), dim=-1, stable=True)
    return order.gather(-1, nan_last)


def select_patches_ref(unit_scores: Tensor, num_keep: int, grid: Tuple[int, int],
                       block: int) -> Tensor:
    """The kept patch positions: unit scores [Bx, U] -> idx [Bx, num_keep * b * b] int64, ascending."""
    bx = unit_scores.shape[0]
    hg, wg = grid
    best = rank_units_ref(unit_scores)[:, :num_keep]
    unit_mask = torch.zeros_like(unit_scores, dtype=torch.bool).scatter_(1, best, True)
    patch_mask = (unit_mask.view(bx, hg // block, 1, wg // block, 1)
                  .expand(bx, hg // block, block, wg // block, block)
                  .reshape(bx, hg * wg))
    return patch_mask.nonzero()[:, 1].view(bx, num_keep * block * block)


def gather_tokens_ref(x: Tensor, idx: Tensor, num_prefix_tokens: int) -> Tensor:
    """x [Bx, P+N, D], idx [Bx, n] -> kept [Bx, P+n, D]: the prefix rows, then the rows at P + idx."""
    patches = x[:, num_prefix_tokens:].gather(1, idx[:, :, None].expand(-1, -1, x.shape[-1]))
    return torch.cat([x[:, :num_prefix_tokens], patches], dim=1)


def scatter_tokens_ref(grad_kept: Tensor, idx: Tensor, num_prefix_tokens: int,
                       num_patches: int) -> Tensor:
    """The backward of the gather: grad_kept [Bx, P+n, D] -> grad_x [Bx, P+N, D], zero where not kept."""
    bx, _, d = grad_kept.shape
    p = num_prefix_tokens
    grad_x = grad_kept.new_zeros(bx, p + num_patches, d)
    grad_x[:, :p] = grad_kept[:, :p]
    grad_x[:, p:].scatter_(1, idx[:, :, None].expand(-1, -1, d), grad_kept[:, p:])
    return grad_x


def _score_grid(num: int, shape: Optional[Tuple[int, int]] = None) -> Tuple[int, int]:
    if shape is not None:
        return shape
    side = int(round(num ** 0.5))
    return side, side


def attentive_mask_ref(x: Tensor, scores: Optional[Tensor] = None, keep=0.5, *,
                       q: Optional[Tensor] = None, k: Optional[Tensor] = None,
                       prior: Optional[Tensor] = None, num_prefix_tokens: int = 1,
                       grid: Optional[Tuple[int, int]] = None, block: int = 1,
                       boxes: Optional[Tensor] = None, scale: Optional[float] = None
                       ) -> Tuple[Tensor, Tensor]:
    """Keep the prefix tokens and the best-scoring patches of every view.

    x [Bx, P+N, D]; scores [Bs, Ns] or [Bs, Hs, Ws], or q [Bs, H, Dh] + k [Bs, H, P+Ns, Dh]
    (+ prior [Bs, Ns]) -> kept [Bx, P + n*b*b, D], idx [Bx, n*b*b] int64 ascending.
    Inputs are assumed valid (the public op checks them). The gradient of x flows through the
    gather (a scatter back to the kept rows); the scores get none.
    """
    p = num_prefix_tokens
    bx, n_patches = x.shape[0], x.shape[1] - p
    grid = _score_grid(n_patches, grid)
    with torch.no_grad():
        if scores is None:
            scores = cls_attention_ref(q, k, p, scale)
            if prior is not None:
                scores = prior.to(scores.dtype) + scores
        if scores.dim() == 3:
            score_map = scores
        else:
            score_map = scores.view(scores.shape[0], *_score_grid(scores.shape[1]))
        score_map = score_map.to(torch.float32)
        views = bx // score_map.shape[0]
        score_map = score_map.repeat(views, 1, 1)
        cell_scores = align_scores_ref(score_map, boxes, grid)
        unit_scores = pool_blocks_ref(cell_scores, block).flatten(1)
        n_keep = num_keep_units(keep, unit_scores.shape[1])
        idx = select_patches_ref(unit_scores, n_keep, grid, block)
    return gather_tokens_ref(x, idx, p), idx


def cls_attention_backward_ref(grad: Tensor, q: Tensor, k: Tensor, num_prefix_tokens: int,
                               scale: float) -> Tuple[Tensor, Tensor]:
    """Gradients of ``cls_attention_ref`` for q and k, written out (used by the kernel backends).

    grad [B, N] -> (grad_q [B, H, Dh], grad_k [B, H, T, Dh]) in the dtypes of q and k.
    """
    dtype = torch.promote_types(q.dtype, torch.float32)
    qf, kf = q.to(dtype), k.to(dtype)
    heads = q.shape[1]
    probs = (torch.einsum("bhd,bhtd->bht", qf, kf) * scale).softmax(dim=-1)
    grad_probs = torch.zeros_like(probs)
    grad_probs[:, :, num_prefix_tokens:] = grad.to(dtype)[:, None, :] / heads
    grad_logits = probs * (grad_probs - (probs * grad_probs).sum(-1, keepdim=True)) * scale
    grad_q = torch.einsum("bht,bhtd->bhd", grad_logits, kf)
    grad_k = grad_logits[..., None] * qf[:, :, None, :]
    return grad_q.to(q.dtype), grad_k.to(k.dtype)

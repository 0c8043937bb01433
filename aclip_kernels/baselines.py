"""The pipelines the kernels are measured against, re-expressed in PyTorch.

- ``aclip_published_mask``: A-CLIP's published masking (microsoft/A-CLIP), step by step: a
  per-sample loop that resizes the score map to the EMA crop's pixel size, crops the online box and
  resizes back to the online grid; a 7x7 bilinear downsample; argsort; a boolean mask scattered and
  expanded to 2x2; argsort of the mask; gather.
- ``timm_style_mask``: timm's ``patch_dropout_forward`` with known scores: argsort, sort, gather.
- ``index_select_floor``: copying the same kept rows with precomputed indices, the floor for any
  selection-and-gather kernel.
"""
from __future__ import annotations

from typing import Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["aclip_published_mask", "timm_style_mask", "index_select_floor", "flat_row_indices"]


def aclip_published_mask(x: Tensor, scores: Tensor, boxes: Tensor, keep_blocks: int,
                         ema_pixels: Tuple[int, int] = (224, 224), block: int = 2) -> Tuple[Tensor, Tensor]:
    """x [Bx, 1+N, D], scores [Bs, N], boxes [Bx, 4] (y0, x0, h, w) -> (kept, idx) as the published code."""
    bx, d = x.shape[0], x.shape[-1]
    bs, n = scores.shape
    side = int(round(n ** 0.5))
    grid = int(round((x.shape[1] - 1) ** 0.5))
    maps = []
    for i in range(bx):                                   # the published per-sample loop
        full = F.interpolate(scores[i % bs].view(1, 1, side, side), size=ema_pixels, mode="bilinear",
                             align_corners=False)
        y0, x0, h, w = (boxes[i].cpu() * torch.tensor([ema_pixels[0], ema_pixels[1]] * 2)).round().long().tolist()
        crop = full[:, :, y0:y0 + max(h, 1), x0:x0 + max(w, 1)]
        maps.append(F.interpolate(crop, size=(grid, grid), mode="bilinear", align_corners=False))
    cell_scores = torch.cat(maps)                          # [Bx, 1, grid, grid]
    coarse = F.interpolate(cell_scores, size=(grid // block, grid // block), mode="bilinear",
                           align_corners=False).flatten(1)
    order = coarse.argsort(dim=1, descending=True)
    unit_mask = torch.zeros_like(coarse, dtype=torch.bool).scatter_(1, order[:, :keep_blocks], True)
    mask = (unit_mask.view(bx, grid // block, grid // block)
            .repeat_interleave(block, 1).repeat_interleave(block, 2).flatten(1))
    idx = torch.argsort((~mask).to(torch.uint8), dim=1, stable=True)[:, :keep_blocks * block * block]
    patches = x[:, 1:].gather(1, idx[:, :, None].expand(-1, -1, d))
    return torch.cat([x[:, :1], patches], dim=1), idx


def timm_style_mask(x: Tensor, scores: Tensor, num_keep: int, num_prefix_tokens: int = 1
                    ) -> Tuple[Tensor, Tensor]:
    """x [Bx, P+N, D], scores [Bx, N] -> the num_keep best patches by argsort, ordered, gathered."""
    idx = scores.argsort(dim=1, descending=True)[:, :num_keep].sort(dim=1).values
    patches = x[:, num_prefix_tokens:].gather(1, idx[:, :, None].expand(-1, -1, x.shape[-1]))
    return torch.cat([x[:, :num_prefix_tokens], patches], dim=1), idx


def flat_row_indices(idx: Tensor, num_prefix_tokens: int, num_tokens: int) -> Tensor:
    """Row indices into x.view(Bx*T, D) of the prefix and kept rows: [Bx*(P+n)] int64."""
    bx = idx.shape[0]
    prefix = torch.arange(num_prefix_tokens, device=idx.device).expand(bx, -1)
    rows = torch.cat([prefix, idx + num_prefix_tokens], dim=1)
    return (rows + torch.arange(bx, device=idx.device)[:, None] * num_tokens).flatten()


def index_select_floor(x: Tensor, flat_rows: Tensor) -> Tensor:
    """Copy the rows at ``flat_rows`` (from ``flat_row_indices``) of contiguous x: [Bx*(P+n), D]."""
    return x.view(-1, x.shape[-1]).index_select(0, flat_rows)

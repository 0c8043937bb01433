"""Argument checks shared by the public ops: every error names the argument and the shapes seen,
and is raised before any kernel runs."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence, Tuple

import torch
from torch import Tensor

from ..reference import num_keep_units


def shape_of(t: Tensor) -> str:
    return "[" + ", ".join(str(s) for s in t.shape) + "]"


def check_tensor(name: str, t, rank: int, layout: str, floating: bool = True) -> Tensor:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a tensor {layout}; got {type(t).__name__}")
    if floating and not t.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor {layout}; got dtype {t.dtype}")
    if t.dim() != rank:
        raise ValueError(f"{name} must have {rank} dims {layout}; got shape {shape_of(t)}")
    return t


def check_same_device(reference_name: str, reference: Tensor, **others: Optional[Tensor]) -> None:
    for name, t in others.items():
        if t is not None and t.device != reference.device:
            raise ValueError(f"{name} is on {t.device} but {reference_name} is on {reference.device}; "
                             "all tensors must be on one device")


def check_prefix(num_prefix_tokens, num_tokens: int, name: str) -> int:
    if isinstance(num_prefix_tokens, bool) or not isinstance(num_prefix_tokens, int):
        raise TypeError(f"num_prefix_tokens must be an int; got {num_prefix_tokens!r}")
    if not 0 <= num_prefix_tokens < num_tokens:
        raise ValueError(f"num_prefix_tokens={num_prefix_tokens} must be in [0, {num_tokens}) "
                         f"for {name} with {num_tokens} tokens")
    return num_prefix_tokens


def square_grid(name: str, num: int, shape_text: str) -> Tuple[int, int]:
    side = math.isqrt(num)
    if side * side != num:
        raise ValueError(f"{name} has {num} patches ({shape_text}), which is not a square grid; "
                         "pass the grid explicitly")
    return side, side


def check_qk(q, k, num_prefix_tokens) -> Tuple[Tensor, Tensor, int]:
    """q [B, H, Dh], k [B, H, T, Dh] -> (q, k, N)."""
    check_tensor("q", q, 3, "[B, H, Dh]")
    check_tensor("k", k, 4, "[B, H, T, Dh]")
    b, h, dh = q.shape
    if (k.shape[0], k.shape[1], k.shape[3]) != (b, h, dh):
        raise ValueError(f"k {shape_of(k)} must be [B, H, T, Dh] matching q {shape_of(q)} "
                         "in batch, heads and head dim")
    check_same_device("q", q, k=k)
    check_prefix(num_prefix_tokens, k.shape[2], "k")
    return q, k, k.shape[2] - num_prefix_tokens


@dataclass(frozen=True)
class MaskArgs:
    """Checked, normalised arguments of attentive_mask (what every backend receives)."""
    x: Tensor                    # [Bx, P+N, D]
    scores: Optional[Tensor]     # [Bs, Hs*Ws], or None with q and k
    q: Optional[Tensor]          # [Bs, H, Dh]
    k: Optional[Tensor]          # [Bs, H, P+Hs*Ws, Dh]
    prior: Optional[Tensor]      # [Bs, Hs*Ws]
    boxes: Optional[Tensor]      # [Bx, 4] float32, or None
    num_prefix_tokens: int
    score_grid: Tuple[int, int]  # (Hs, Ws)
    grid: Tuple[int, int]        # (Hg, Wg)
    block: int
    num_units: int               # n, the number of units kept
    scale: float

    @property
    def num_patches_kept(self) -> int:
        return self.num_units * self.block * self.block


def check_mask_args(x, scores, keep, q, k, prior, num_prefix_tokens, grid: Optional[Sequence[int]],
                    block, boxes, scale) -> MaskArgs:
    check_tensor("x", x, 3, "[Bx, P+N, D]")
    p = check_prefix(num_prefix_tokens, x.shape[1], "x")
    bx, n = x.shape[0], x.shape[1] - p

    if (scores is None) == (q is None and k is None):
        raise ValueError("give either scores, or q and k (with an optional prior), not both or neither")
    if scores is not None:
        if prior is not None:
            raise ValueError("prior adds to the fused q/k scores; with scores given, add it yourself")
        if not isinstance(scores, Tensor) or scores.dim() not in (2, 3):
            raise ValueError("scores must be [Bs, N] or [Bs, Hs, Ws]; got "
                             f"{shape_of(scores) if isinstance(scores, Tensor) else type(scores).__name__}")
        check_tensor("scores", scores, scores.dim(), "[Bs, N] or [Bs, Hs, Ws]")
        if scores.dim() == 3:
            score_grid = (scores.shape[1], scores.shape[2])
        else:
            score_grid = square_grid("scores", scores.shape[1], shape_of(scores))
        bs = scores.shape[0]
        scores = scores.reshape(bs, score_grid[0] * score_grid[1])
    else:
        if q is None or k is None:
            raise ValueError("the fused scores need both q and k")
        q, k, ns = check_qk(q, k, p)
        bs = q.shape[0]
        score_grid = square_grid("k", ns, shape_of(k))
        if prior is not None:
            check_tensor("prior", prior, 2, "[Bs, N]")
            if tuple(prior.shape) != (bs, ns):
                raise ValueError(f"prior must be [Bs, N] = [{bs}, {ns}] like the scores of k "
                                 f"{shape_of(k)}; got {shape_of(prior)}")
        scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    if bs == 0 or bx % bs:
        raise ValueError(f"x has {bx} rows, which is not a multiple of the {bs} rows of the scores "
                         f"(x {shape_of(x)}); views must be stacked view-major")

    if grid is None:
        grid = square_grid("x", n, shape_of(x))
    else:
        grid = tuple(int(g) for g in grid)
        if len(grid) != 2 or grid[0] * grid[1] != n:
            raise ValueError(f"grid={grid} must be (Hg, Wg) with Hg*Wg = N = {n} patches of x {shape_of(x)}")
    if isinstance(block, bool) or not isinstance(block, int) or block < 1:
        raise ValueError(f"block must be a positive int; got {block!r}")
    if grid[0] % block or grid[1] % block:
        raise ValueError(f"block={block} must divide the grid {grid} of x {shape_of(x)}")
    if boxes is not None:
        if not isinstance(boxes, Tensor) or tuple(boxes.shape) != (bx, 4):
            got = shape_of(boxes) if isinstance(boxes, Tensor) else type(boxes).__name__
            raise ValueError(f"boxes must be [Bx, 4] = [{bx}, 4] (y0, x0, h, w), one per row of x; got {got}")
        check_tensor("boxes", boxes, 2, "[Bx, 4]")
        boxes = boxes.to(torch.float32).contiguous()

    num_units = (grid[0] // block) * (grid[1] // block)
    if isinstance(keep, bool) or not isinstance(keep, (int, float)):
        raise TypeError(f"keep must be an int (units) or a float fraction in (0, 1]; got {keep!r}")
    if isinstance(keep, float) and not 0.0 < keep <= 1.0:
        raise ValueError(f"keep={keep} as a fraction must be in (0, 1]")
    if isinstance(keep, int) and not 0 < keep <= num_units:
        raise ValueError(f"keep={keep} units must be in [1, {num_units}] "
                         f"(grid {grid}, block {block}, x {shape_of(x)})")

    check_same_device("x", x, scores=scores, q=q, k=k, prior=prior, boxes=boxes)
    return MaskArgs(x, scores, q, k, prior, boxes, p, score_grid, grid, block,
                    num_keep_units(keep, num_units), 0.0 if scale is None else float(scale))

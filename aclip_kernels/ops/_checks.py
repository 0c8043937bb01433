"""Argument checks shared by the public ops: every error names the argument and the shapes seen,
and is raised before any kernel runs."""
from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from typing import NamedTuple, Optional, Tuple

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


def check_int(name: str, value) -> int:
    """An integer of any kind (Python, numpy), never a bool -> int."""
    if type(value) is int:  # the common case, without the slow abstract-class checks
        return value
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int; got {value!r} ({type(value).__name__})")
    return int(value)


def check_real(name: str, value) -> float:
    """A finite real number of any kind (Python, numpy), never a bool -> float (-0.0 as 0.0)."""
    if type(value) is float and math.isfinite(value):
        return value + 0.0
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number; got {value!r} ({type(value).__name__})")
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite; got {value!r}")
    return float(value) + 0.0


def check_prefix(num_prefix_tokens, num_tokens: int, name: str) -> int:
    num_prefix_tokens = check_int("num_prefix_tokens", num_prefix_tokens)
    if not 0 <= num_prefix_tokens < num_tokens:
        raise ValueError(f"num_prefix_tokens={num_prefix_tokens} must be in [0, {num_tokens}) "
                         f"for {name} with {num_tokens} tokens")
    return num_prefix_tokens


def square_grid(name: str, num: int, shape_text) -> Tuple[int, int]:
    """(side, side) for ``num`` patches; ``shape_text`` (a string, or the tensor, formatted only for the error)."""
    side = math.isqrt(num)
    if side * side != num:
        shape_text = shape_text if isinstance(shape_text, str) else shape_of(shape_text)
        raise ValueError(f"{name} has {num} patches ({shape_text}), which is not a square grid; "
                         "pass the grid explicitly")
    return side, side


def check_pair(name: str, pair) -> tuple:
    """Two items of a tuple, list, torch.Size or numpy array."""
    items = None if isinstance(pair, (str, bytes, Tensor)) or not hasattr(pair, "__len__") else tuple(pair)
    if items is None or len(items) != 2:
        raise TypeError(f"{name} must be a pair of ints; got {pair!r}")
    return items


def check_grid(grid, num_patches: int, x: Tensor) -> Tuple[int, int]:
    """(Hg, Wg): two positive ints whose product is the number of patches of x."""
    sides = tuple(check_int("grid", g) for g in check_pair("grid", grid))
    if min(sides) < 1 or sides[0] * sides[1] != num_patches:
        raise ValueError(f"grid={sides} must be (Hg, Wg) of positive sides with Hg*Wg = N = {num_patches} "
                         f"patches of x {shape_of(x)}")
    return sides


def check_tokens(x, num_prefix_tokens, grid: Optional[Sequence]) -> Tuple[int, Tuple[int, int]]:
    """x [Bx, P+N, D] -> (P, (Hg, Wg)): the grid of its N patches, square when ``grid`` is None."""
    check_tensor("x", x, 3, "[Bx, P+N, D]")
    p = check_prefix(num_prefix_tokens, x.shape[1], "x")
    n = x.shape[1] - p
    return p, square_grid("x", n, x) if grid is None else check_grid(grid, n, x)


def check_scale(scale, head_dim: int) -> float:
    """The logit scale: ``head_dim ** -0.5`` when None."""
    return head_dim ** -0.5 if scale is None else check_real("scale", scale)


def check_qk(q, k, num_prefix_tokens) -> Tuple[Tensor, Tensor, int]:
    """q [B, H, Dh], k [B, H, T, Dh] of one dtype, H and Dh >= 1 -> (q, k, N)."""
    check_tensor("q", q, 3, "[B, H, Dh]")
    check_tensor("k", k, 4, "[B, H, T, Dh]")
    b, h, dh = q.shape
    if (k.shape[0], k.shape[1], k.shape[3]) != (b, h, dh) or h < 1 or dh < 1:
        raise ValueError(f"k {shape_of(k)} must be [B, H, T, Dh] matching q {shape_of(q)} "
                         "in batch, heads (>= 1) and head dim (>= 1)")
    if q.dtype != k.dtype:  # one rule for every backend: the kernels read q and k as one type
        raise TypeError(f"q and k must have one dtype; got q {q.dtype} and k {k.dtype}")
    check_same_device("q", q, k=k)
    check_prefix(num_prefix_tokens, k.shape[2], "k")
    return q, k, k.shape[2] - num_prefix_tokens


def check_boxes_finite(boxes: Tensor) -> None:
    """A value check (it synchronises with a GPU); skipped while torch.compile traces, where the
    kernels clamp a non-finite box to the border instead."""
    if torch.compiler.is_compiling():
        return
    bad = ~torch.isfinite(boxes)
    if bad.any():
        row = int(bad.any(dim=1).nonzero()[0, 0])
        raise ValueError(f"boxes must be finite; row {row} is {boxes[row].tolist()}")


def check_backward_args(grad_kept: Tensor, idx: Tensor, num_prefix_tokens: int, num_patches: int) -> None:
    """The attentive_mask_backward contract (csrc/checks.h): idx [Bx, M] int64, every row strictly
    ascending in [0, num_patches), grad_kept [Bx, P+M, D]. The value check is skipped under torch.compile."""
    check_tensor("grad_kept", grad_kept, 3, "[Bx, P+M, D]")
    check_tensor("idx", idx, 2, "[Bx, M]", floating=False)
    if idx.dtype != torch.int64:
        raise TypeError(f"idx must be int64; got {idx.dtype}")
    check_same_device("grad_kept", grad_kept, idx=idx)
    p, m = check_int("num_prefix_tokens", num_prefix_tokens), idx.shape[1]
    if idx.shape[0] != grad_kept.shape[0] or p < 0 or grad_kept.shape[1] != p + m:
        raise ValueError(f"grad_kept {shape_of(grad_kept)} must be [Bx, P+M, D] for idx {shape_of(idx)} and P={p}")
    if not m <= check_int("num_patches", num_patches) < 2 ** 31:
        raise ValueError(f"num_patches={num_patches} must be in [M={m}, 2**31)")
    if idx.numel() == 0 or torch.compiler.is_compiling():
        return
    bad = (idx < 0) | (idx >= num_patches)
    bad[:, 1:] |= idx[:, 1:] <= idx[:, :-1]
    if bool(bad.any()):  # one value check, one sync with a GPU
        raise ValueError(f"every row of idx must ascend strictly inside [0, num_patches={num_patches}), "
                         "as the forward returns it")


class MaskCall(NamedTuple):
    """The checked, normalised arguments of one attentive_mask call (what every backend receives),
    in the order of the op schema's arguments."""
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


class MaskPlan(NamedTuple):
    """What ``check_mask_meta`` decides from the arguments' metadata: the non-tensor fields of MaskCall."""
    num_prefix_tokens: int
    score_grid: Tuple[int, int]
    grid: Tuple[int, int]
    block: int
    num_units: int
    scale: float


def check_scores(scores, prior) -> Tuple[int, int]:
    """scores [Bs, N] (square grid) or [Bs, Hs, Ws] -> (Hs, Ws)."""
    if prior is not None:
        raise ValueError("prior adds to the fused q/k scores; with scores given, add it yourself")
    if not isinstance(scores, Tensor) or scores.dim() not in (2, 3):
        raise ValueError("scores must be [Bs, N] or [Bs, Hs, Ws]; got "
                         f"{shape_of(scores) if isinstance(scores, Tensor) else type(scores).__name__}")
    check_tensor("scores", scores, scores.dim(), "[Bs, N] or [Bs, Hs, Ws]")
    if scores.dim() == 3:
        return scores.shape[1], scores.shape[2]
    return square_grid("scores", scores.shape[1], scores)


def check_fused(q, k, prior, num_prefix_tokens: int, k_grid: Optional[Tuple[int, int]]) -> Tuple[int, int]:
    """The fused scores' q [Bs, H, Dh], k [Bs, H, P+Hs*Ws, Dh], prior [Bs, Hs*Ws] -> (Hs, Ws)."""
    if q is None or k is None:
        raise ValueError("the fused scores need both q and k")
    q, k, ns = check_qk(q, k, num_prefix_tokens)
    score_grid = square_grid("k", ns, k) if k_grid is None else k_grid
    if score_grid[0] * score_grid[1] != ns:
        raise ValueError(f"score_grid={score_grid} does not match the {ns} patches of k {shape_of(k)}")
    check_prior(prior, q.shape[0], ns, k)
    return score_grid


def check_block(block, grid: Tuple[int, int], x: Tensor) -> int:
    block = check_int("block", block)
    if block < 1:
        raise ValueError(f"block must be a positive int; got {block!r}")
    if grid[0] % block or grid[1] % block:
        raise ValueError(f"block={block} must divide the grid {grid} of x {shape_of(x)}")
    return block


def check_boxes(boxes, x: Tensor) -> None:
    """boxes [Bx, 4] (one per row of x), or None; the metadata only (``mask_call`` checks the values)."""
    if boxes is None:
        return
    bx = x.shape[0]
    if not isinstance(boxes, Tensor) or tuple(boxes.shape) != (bx, 4):
        got = shape_of(boxes) if isinstance(boxes, Tensor) else type(boxes).__name__
        raise ValueError(f"boxes must be [Bx, 4] = [{bx}, 4] (y0, x0, h, w), one per row of x; got {got}")
    check_tensor("boxes", boxes, 2, "[Bx, 4]")
    check_same_device("x", x, boxes=boxes)


def check_keep(keep, num_units: int, keep_name: str, context: str) -> int:
    """keep, an int number of units or a float fraction -> the number of units kept."""
    if type(keep) not in (int, float) and (isinstance(keep, bool) or not isinstance(keep, numbers.Real)):
        raise TypeError(f"{keep_name} must be an int (units) or a float fraction in (0, 1]; got {keep!r}")
    if isinstance(keep, numbers.Integral):
        keep = int(keep)
        if not 0 < keep <= num_units:
            raise ValueError(f"{keep_name}={keep} units must be in [1, {num_units}] ({context})")
    else:
        keep = float(keep)
        if not 0.0 < keep <= 1.0:
            raise ValueError(f"{keep_name}={keep} as a fraction must be in (0, 1]")
    return num_keep_units(keep, num_units)


def check_mask_meta(x, scores, keep, q, k, prior, num_prefix_tokens, grid: Optional[Sequence],
                    block, boxes, scale, keep_name: str = "keep",
                    k_grid: Optional[Tuple[int, int]] = None) -> MaskPlan:
    """Every check of attentive_mask's public arguments that reads only metadata (types, shapes,
    dtypes, devices, the values of the non-tensor arguments). ``keep_name`` is what messages call
    ``keep``; ``k_grid`` the grid of k's patches (default square)."""
    p, grid = check_tokens(x, num_prefix_tokens, grid)
    if (scores is None) == (q is None and k is None):
        raise ValueError("give either scores, or q and k (with an optional prior), not both or neither")
    if scores is not None:
        score_grid = check_scores(scores, prior)
        bs = scores.shape[0]
    else:
        score_grid = check_fused(q, k, prior, p, k_grid)
        bs, scale = q.shape[0], check_scale(scale, q.shape[-1])
    if bs == 0 or x.shape[0] % bs:
        raise ValueError(f"x has {x.shape[0]} rows, which is not a multiple of the {bs} rows of the scores "
                         f"(x {shape_of(x)}); views must be stacked view-major")
    block = check_block(block, grid, x)
    check_boxes(boxes, x)
    num_units = check_keep(keep, (grid[0] // block) * (grid[1] // block), keep_name,
                           f"grid {grid}, block {block}, x {shape_of(x)}")
    check_same_device("x", x, scores=scores, q=q, k=k, prior=prior)
    return MaskPlan(p, score_grid, grid, block, num_units, 0.0 if scale is None else check_real("scale", scale))


def mask_call(plan: MaskPlan, x: Tensor, scores: Optional[Tensor], q: Optional[Tensor], k: Optional[Tensor],
              prior: Optional[Tensor], boxes: Optional[Tensor], check_values: bool) -> MaskCall:
    """The MaskCall of arguments that passed ``check_mask_meta`` with ``plan``: the per-call part of the
    checks. ``check_values=False`` leaves the finiteness of ``boxes`` (a value check, which
    synchronises with a GPU) to the compiled op."""
    if boxes is not None:
        if check_values:
            check_boxes_finite(boxes)
        if boxes.dtype != torch.float32 or not boxes.is_contiguous():
            boxes = boxes.to(torch.float32).contiguous()
    if scores is not None and scores.dim() == 3:
        scores = scores.reshape(scores.shape[0], scores.shape[1] * scores.shape[2])
    if torch.compiler.is_compiling():  # torch 2.11's Dynamo cannot trace tuple + NamedTuple
        return MaskCall(x, scores, q, k, prior, boxes, *plan)
    return tuple.__new__(MaskCall, (x, scores, q, k, prior, boxes) + plan)  # MaskCall(...) is 0.3 µs slower


def check_mask_args(x, scores, keep, q, k, prior, num_prefix_tokens, grid: Optional[Sequence],
                    block, boxes, scale, check_values: bool = True, keep_name: str = "keep",
                    k_grid: Optional[Tuple[int, int]] = None) -> MaskCall:
    """The public arguments of attentive_mask, checked and normalised (``check_mask_meta``, then
    ``mask_call``)."""
    plan = check_mask_meta(x, scores, keep, q, k, prior, num_prefix_tokens, grid, block, boxes, scale,
                           keep_name, k_grid)
    return mask_call(plan, x, scores, q, k, prior, boxes, check_values)


def check_prior(prior: Optional[Tensor], batch: int, num_patches: int, k: Tensor) -> Optional[Tensor]:
    if prior is not None:
        check_tensor("prior", prior, 2, "[Bs, N]")
        if tuple(prior.shape) != (batch, num_patches):
            raise ValueError(f"prior must be [Bs, N] = [{batch}, {num_patches}] like the scores of k "
                             f"{shape_of(k)}; got {shape_of(prior)}")
        check_same_device("k", k, prior=prior)
    return prior


def check_out(out, q: Tensor, k: Tensor, num_patches: int) -> None:
    """The deprecated ``out`` of cls_attention: float32 [B, N], on q's device."""
    if not isinstance(out, Tensor) or tuple(out.shape) != (q.shape[0], num_patches) or out.dtype != torch.float32:
        got = f"{shape_of(out)} {out.dtype}" if isinstance(out, Tensor) else type(out).__name__
        raise ValueError(f"out must be a float32 tensor [B, N] = [{q.shape[0]}, {num_patches}] for k "
                         f"{shape_of(k)}; got {got}")
    check_same_device("q", q, out=out)


def check_cls_attention_args(q, k, num_prefix_tokens, scale, prior, out) -> Tuple[int, float]:
    """The public arguments of cls_attention (``out``: the deprecated one) -> (N, scale)."""
    q, k, n = check_qk(q, k, num_prefix_tokens)
    if out is not None:
        check_out(out, q, k, n)
    check_prior(prior if out is None else out, q.shape[0], n, k)
    return n, check_scale(scale, q.shape[-1])


def check_cls_attention_op(q, k, num_prefix_tokens, prior) -> None:
    """The cls_attention op schema's contract (csrc/checks.h), for a direct call of the Triton op."""
    q, k, n = check_qk(q, k, num_prefix_tokens)
    check_prior(prior, q.shape[0], n, k)


def check_mask_op(x, scores, q, k, prior, boxes, num_prefix_tokens, score_grid, grid, block, num_units,
                  scale) -> MaskCall:
    """The attentive_mask op schema's contract (csrc/checks.h), for a direct call of the Triton op:
    the public checks applied to the schema's arguments, and the score grid checked against them."""
    hs, ws = (check_int("score_grid", side) for side in check_pair("score_grid", score_grid))
    if isinstance(scores, Tensor):
        if scores.dim() != 2 or hs < 1 or ws < 1 or scores.shape[1] != hs * ws:
            raise ValueError(f"scores must be [Bs, Hs*Ws] for score_grid={tuple(score_grid)}; got {shape_of(scores)}")
        scores = scores.reshape(scores.shape[0], hs, ws)
    return check_mask_args(x, scores, check_int("num_units", num_units), q, k, prior, num_prefix_tokens, grid,
                           block, boxes, scale, keep_name="num_units", k_grid=(hs, ws))

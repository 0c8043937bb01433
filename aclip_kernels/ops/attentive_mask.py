"""attentive_mask: keep the prefix tokens and the best-scoring patches (or blocks) of every view.

The whole registration of the op and of its backward: the schemas (defined here once; the compiled
CPU and CUDA kernels register implementations of them), the fake kernels and autograd, the Triton
ops of the same schemas, and the public function that checks the arguments and dispatches.
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from ..backends import TRITON_MISSING, resolve_backend
from ..reference import attentive_mask_ref
from ._check_cache import cached_mask_meta
from ._checks import MaskCall, check_backward_args, check_boxes_finite, check_mask_op, mask_call
from .._op_call import call_op
from ._define import define, register_triton_op

if TRITON_MISSING is None:
    from ..triton._common import call_checked, consume_checked
    from ..triton._common import check_device as check_triton_device
    from ..triton.attentive_mask import launch_attentive_mask, launch_attentive_mask_backward

__all__ = ["attentive_mask", "SCHEMA", "BACKWARD_SCHEMA"]

SCHEMA = ("(Tensor x, Tensor? scores, Tensor? q, Tensor? k, Tensor? prior, Tensor? boxes, "
          "int num_prefix_tokens, int[] score_grid, int[] grid, int block, int num_units, "
          "float scale) -> (Tensor, Tensor)")
BACKWARD_SCHEMA = "(Tensor grad_kept, Tensor idx, int num_prefix_tokens, int num_patches) -> Tensor"
OP = define("attentive_mask", SCHEMA)
BACKWARD_OP = define("attentive_mask_backward", BACKWARD_SCHEMA)
COMPILED_OP = torch.ops.aclip_kernels.attentive_mask  # the op the cpu and cuda backends implement


def attentive_mask(x: Tensor, scores: Optional[Tensor] = None, keep=0.5, *,
                   q: Optional[Tensor] = None, k: Optional[Tensor] = None,
                   prior: Optional[Tensor] = None, num_prefix_tokens: int = 1,
                   grid: Optional[Sequence[int]] = None, block: int = 1,
                   boxes: Optional[Tensor] = None, return_indices: bool = True,
                   scale: Optional[float] = None, backend: Optional[str] = None):
    """Select and gather the tokens an online view keeps.

    x: [Bx, P+N, D] tokens of the online view(s), Bx = V * Bs stacked view-major.
    Scores, higher = keep, either ``scores`` [Bs, Ns] / [Bs, Hs, Ws], or fused from the EMA
    layer's ``q`` [Bs, H, Dh] and ``k`` [Bs, H, P+Ns, Dh] (+ ``prior`` [Bs, Ns]):
    ``prior + cls_attention(q, k)``. Row i of the scores serves every view of image i.
    grid: (Hg, Wg) of the online patches (default square). boxes: [Bx, 4] (y0, x0, h, w), the
    online crop in the scores' normalised frame; the scores are sampled bilinearly at the online
    cell centres (border clamp). block: select b x b blocks scored by their mean.
    keep: an int number of units, or a float fraction: ``max(1, min(U, int(keep * U + 0.5)))``.

    Returns ``kept`` [Bx, P + n*b*b, D] (prefix first, then the kept patches in ascending
    position) and ``idx`` [Bx, n*b*b] int64 (ascending), or ``kept`` alone when
    ``return_indices=False``. Ties go to the lower index and NaN ranks lowest. The gradient of x
    is ``grad(kept)`` scattered back to the kept rows, zero elsewhere; nothing else gets one.
    """
    impl = resolve_backend(backend, x.device if isinstance(x, Tensor) else torch.device("cpu"))
    plan = cached_mask_meta(x, scores, keep, q, k, prior, num_prefix_tokens, grid, block, boxes, scale)
    # The compiled ops check the finiteness of boxes themselves: one value check (a GPU sync) per call.
    args = mask_call(plan, x, scores, q, k, prior, boxes, check_values=impl == "torch")
    if impl == "torch":
        kept_idx = mask_torch(args)
    elif impl == "triton":
        check_triton_device(args.x)
        kept_idx = call_checked(torch.ops.aclip_kernels.attentive_mask_triton, *args)
    else:
        kept_idx = call_op(COMPILED_OP, *args)  # a MaskCall holds the schema's arguments, in order
    return kept_idx if return_indices else kept_idx[0]


def mask_torch(args: MaskCall):
    scores = None if args.scores is None else args.scores.view(-1, *args.score_grid)
    return attentive_mask_ref(args.x, scores, args.num_units, q=args.q, k=args.k, prior=args.prior,
                              num_prefix_tokens=args.num_prefix_tokens, grid=args.grid,
                              block=args.block, boxes=args.boxes, scale=args.scale)


def attentive_mask_fake(x, scores, q, k, prior, boxes, num_prefix_tokens, score_grid, grid, block,
                        num_units, scale):
    n = num_units * block * block
    return (x.new_empty(x.shape[0], num_prefix_tokens + n, x.shape[2]),
            x.new_empty(x.shape[0], n, dtype=torch.int64))


def attentive_mask_backward_fake(grad_kept, idx, num_prefix_tokens, num_patches):
    return grad_kept.new_empty(grad_kept.shape[0], num_prefix_tokens + num_patches, grad_kept.shape[2])


def _register(op_name: str, backward_op) -> None:
    """Fake kernel and autograd of an op with ``SCHEMA`` (the compiled op, the Triton op).

    ``backward_op(grad_kept, idx, num_prefix_tokens, num_patches) -> grad_x`` is the scatter.
    """
    def setup_context(ctx, inputs, output):
        x, num_prefix_tokens = inputs[0], inputs[6]
        ctx.save_for_backward(output[1])
        ctx.num_prefix_tokens, ctx.num_patches = num_prefix_tokens, x.shape[1] - num_prefix_tokens

    def backward(ctx, grad_kept, grad_idx):
        (idx,) = ctx.saved_tensors
        grad_x = backward_op(grad_kept, idx, ctx.num_prefix_tokens, ctx.num_patches)
        return (grad_x,) + (None,) * 11

    torch.library.register_fake(op_name)(attentive_mask_fake)
    torch.library.register_autograd(op_name, backward, setup_context=setup_context)


torch.library.register_fake(BACKWARD_OP)(attentive_mask_backward_fake)
_register(OP, torch.ops.aclip_kernels.attentive_mask_backward)

if TRITON_MISSING is None:
    @register_triton_op("attentive_mask")
    def _attentive_mask_triton(x: Tensor, scores: Optional[Tensor], q: Optional[Tensor], k: Optional[Tensor],
                               prior: Optional[Tensor], boxes: Optional[Tensor], num_prefix_tokens: int,
                               score_grid: List[int], grid: List[int], block: int, num_units: int,
                               scale: float) -> Tuple[Tensor, Tensor]:
        if not consume_checked():  # a direct call; the public path has checked its arguments
            check_mask_op(x, scores, q, k, prior, boxes, num_prefix_tokens, score_grid, grid, block, num_units, scale)
        elif boxes is not None:  # the public path leaves this value check (a GPU sync) to the op
            check_boxes_finite(boxes)
        return launch_attentive_mask(x, scores, q, k, prior, boxes, num_prefix_tokens, score_grid, grid, block,
                                     num_units, scale)

    @register_triton_op("attentive_mask_backward")
    def _attentive_mask_backward_triton(grad_kept: Tensor, idx: Tensor, num_prefix_tokens: int,
                                        num_patches: int) -> Tensor:
        check_backward_args(grad_kept, idx, num_prefix_tokens, num_patches)
        return launch_attentive_mask_backward(grad_kept, idx, num_prefix_tokens, num_patches)

    _register(_attentive_mask_triton._qualname, _attentive_mask_backward_triton)

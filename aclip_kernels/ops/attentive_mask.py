"""attentive_mask: keep the prefix tokens and the best-scoring patches (or blocks) of every view."""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor

from .._library import BUILD_INFO
from ..backends import resolve_backend
from ..reference import attentive_mask_ref
from ._checks import MaskArgs, check_mask_args

__all__ = ["attentive_mask"]


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
    # The compiled ops check the finiteness of boxes themselves: one value check (a GPU sync) per call.
    args = check_mask_args(x, scores, keep, q, k, prior, num_prefix_tokens, grid, block, boxes, scale,
                           check_values=impl == "torch")
    if impl == "torch":
        kept, idx = mask_torch(args)
    elif impl == "triton":
        from ..triton import attentive_mask as triton_attentive_mask
        kept, idx = triton_attentive_mask(args)
    else:
        kept, idx = torch.ops.aclip_kernels.attentive_mask(*op_arguments(args))
    return (kept, idx) if return_indices else kept


def mask_torch(args: MaskArgs):
    scores = None if args.scores is None else args.scores.view(-1, *args.score_grid)
    return attentive_mask_ref(args.x, scores, args.num_units, q=args.q, k=args.k, prior=args.prior,
                              num_prefix_tokens=args.num_prefix_tokens, grid=args.grid,
                              block=args.block, boxes=args.boxes, scale=args.scale)


def op_arguments(args: MaskArgs) -> tuple:
    """The positional arguments of the ``attentive_mask`` op schema."""
    return (args.x, args.scores, args.q, args.k, args.prior, args.boxes, args.num_prefix_tokens,
            list(args.score_grid), list(args.grid), args.block, args.num_units, args.scale)


def attentive_mask_fake(x, scores, q, k, prior, boxes, num_prefix_tokens, score_grid, grid, block,
                        num_units, scale):
    n = num_units * block * block
    return (x.new_empty(x.shape[0], num_prefix_tokens + n, x.shape[2]),
            x.new_empty(x.shape[0], n, dtype=torch.int64))


def attentive_mask_backward_fake(grad_kept, idx, num_prefix_tokens, num_patches):
    return grad_kept.new_empty(grad_kept.shape[0], num_prefix_tokens + num_patches, grad_kept.shape[2])


def register_attentive_mask(op_name: str, backward_op) -> None:
    """Fake kernel and autograd for an op with the ``attentive_mask`` schema (compiled or Triton).

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


if BUILD_INFO is not None:
    torch.library.register_fake("aclip_kernels::attentive_mask_backward")(attentive_mask_backward_fake)
    register_attentive_mask("aclip_kernels::attentive_mask",
                            torch.ops.aclip_kernels.attentive_mask_backward)

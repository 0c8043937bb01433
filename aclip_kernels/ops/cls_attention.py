"""cls_attention: the [CLS] row of softmax attention, averaged over heads, without a [T, T] map.

The whole registration of the op: its schema (defined here once; the compiled CPU and CUDA kernels
register implementations of it), the fake kernel and autograd, the Triton op of the same schema,
and the public function that checks the arguments and dispatches to a backend.
"""
from __future__ import annotations

import warnings
from typing import Optional

import torch
from torch import Tensor

from ..backends import TRITON_MISSING, resolve_backend
from ..reference import cls_attention_backward_ref, cls_attention_ref
from ._check_cache import cached_cls_attention_args
from ._checks import check_cls_attention_op
from .._op_call import call_op
from ._define import define, register_triton_op

if TRITON_MISSING is None:
    from ..triton.cls_attention import launch_cls_attention
    from ..triton._common import call_checked, consume_checked
    from ..triton._common import check_device as check_triton_device

__all__ = ["cls_attention", "SCHEMA"]

SCHEMA = "(Tensor q, Tensor k, int num_prefix_tokens, float scale, Tensor? prior) -> Tensor"
OP = define("cls_attention", SCHEMA)


def cls_attention(q: Tensor, k: Tensor, *, num_prefix_tokens: int = 1, scale: Optional[float] = None,
                  prior: Optional[Tensor] = None, backend: Optional[str] = None,
                  out: Optional[Tensor] = None) -> Tensor:
    """``prior + mean_h softmax_t(q[b,h] . k[b,h,t] * scale)[P:]`` -> [B, N] float32 (float64 for
    float64 q).

    q [B, H, Dh] is the [CLS] query of one attention layer, k [B, H, P+N, Dh] its keys (any
    strides; fp32/fp16/bf16/fp64). The softmax runs over all P+N keys, then the prefix columns are
    dropped. ``scale`` defaults to Dh**-0.5. ``prior`` [B, N] (optional) is added, so that layers
    accumulate: ``scores = cls_attention(q, k, prior=scores)``. Differentiable in q, k and prior.

    ``out`` (deprecated, use ``prior``): a [B, N] float32 tensor the result is added into in place;
    ``out`` is returned.
    """
    if out is not None:
        warnings.warn("cls_attention(out=...) is deprecated: use scores = cls_attention(q, k, prior=scores)",
                      DeprecationWarning, stacklevel=2)
        if prior is not None:
            raise ValueError("give prior, or out (deprecated), not both")
    _, scale = cached_cls_attention_args(q, k, num_prefix_tokens, scale, prior, out)
    base = prior if out is None else out
    impl = resolve_backend(backend, q.device)
    if impl == "torch":
        result = cls_attention_ref(q, k, num_prefix_tokens, scale)
        result = result if base is None else base + result
    elif impl == "triton":
        check_triton_device(q)
        result = call_checked(torch.ops.aclip_kernels.cls_attention_triton, q, k, num_prefix_tokens, scale, base)
    else:
        result = call_op(torch.ops.aclip_kernels.cls_attention, q, k, num_prefix_tokens, scale, base)
    return result if out is None else out.copy_(result)


def cls_attention_fake(q, k, num_prefix_tokens, scale, prior):
    dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    return q.new_empty(q.shape[0], k.shape[2] - num_prefix_tokens, dtype=dtype)


def _setup_context(ctx, inputs, output):
    q, k, num_prefix_tokens, scale, prior = inputs
    ctx.save_for_backward(q, k)
    ctx.num_prefix_tokens, ctx.scale, ctx.has_prior = num_prefix_tokens, scale, prior is not None


def _backward(ctx, grad):
    q, k = ctx.saved_tensors
    grad_q, grad_k = cls_attention_backward_ref(grad, q, k, ctx.num_prefix_tokens, ctx.scale)
    return grad_q, grad_k, None, None, grad if ctx.has_prior else None


def _register(op_name: str) -> None:
    """Fake kernel and autograd of an op with ``SCHEMA`` (the compiled op, the Triton op)."""
    torch.library.register_fake(op_name)(cls_attention_fake)
    torch.library.register_autograd(op_name, _backward, setup_context=_setup_context)


_register(OP)

if TRITON_MISSING is None:
    @register_triton_op("cls_attention")
    def _cls_attention_triton(q: Tensor, k: Tensor, num_prefix_tokens: int, scale: float,
                              prior: Optional[Tensor]) -> Tensor:
        if not consume_checked():  # a direct call; the public path has checked its arguments
            check_cls_attention_op(q, k, num_prefix_tokens, prior)
        return launch_cls_attention(q, k, num_prefix_tokens, scale, prior)

    _register(_cls_attention_triton._qualname)

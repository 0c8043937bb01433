"""cls_attention: the [CLS] row of softmax attention, averaged over heads, without a [T, T] map."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .._library import BUILD_INFO
from ..backends import resolve_backend
from ..reference import cls_attention_backward_ref, cls_attention_ref
from ._checks import check_qk, check_same_device, check_scale, shape_of

__all__ = ["cls_attention"]


def cls_attention(q: Tensor, k: Tensor, *, num_prefix_tokens: int = 1, scale: Optional[float] = None,
                  out: Optional[Tensor] = None, backend: Optional[str] = None) -> Tensor:
    """``mean_h softmax_t(q[b,h] . k[b,h,t] * scale)[P:]`` -> [B, N] float32.

    q [B, H, Dh] is the [CLS] query of one attention layer, k [B, H, P+N, Dh] its keys (any
    strides; fp32/fp16/bf16). The softmax runs over all P+N keys, then the prefix columns are
    dropped. ``scale`` defaults to Dh**-0.5. With ``out`` ([B, N] float32) the result is added into
    it and ``out`` is returned, so that layers accumulate. Differentiable in q and k.
    """
    q, k, n = check_qk(q, k, num_prefix_tokens)
    if out is not None:
        if not isinstance(out, Tensor) or tuple(out.shape) != (q.shape[0], n) or out.dtype != torch.float32:
            got = f"{shape_of(out)} {out.dtype}" if isinstance(out, Tensor) else type(out).__name__
            raise ValueError(f"out must be a float32 tensor [B, N] = [{q.shape[0]}, {n}] for k {shape_of(k)}; got {got}")
        check_same_device("q", q, out=out)
    scale = check_scale(scale, q.shape[-1])
    impl = resolve_backend(backend, q.device)
    if impl == "torch":
        result = cls_attention_ref(q, k, num_prefix_tokens, scale)
        result = result if out is None else out + result
    elif impl == "triton":
        from ..triton import cls_attention as triton_cls_attention
        result = triton_cls_attention(q, k, num_prefix_tokens, scale, out)
    else:
        result = torch.ops.aclip_kernels.cls_attention(q, k, num_prefix_tokens, scale, out)
    if out is None:
        return result
    return out.copy_(result)


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


def register_cls_attention(op_name: str) -> None:
    """Fake kernel and autograd for an op with the ``cls_attention`` schema (compiled or Triton)."""
    torch.library.register_fake(op_name)(cls_attention_fake)
    torch.library.register_autograd(op_name, _backward, setup_context=_setup_context)


if BUILD_INFO is not None:
    register_cls_attention("aclip_kernels::cls_attention")

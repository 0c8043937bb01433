"""Running a patched ViT's attention with FlashAttention or xFormers instead of PyTorch SDPA.

The attention modules keep their weights; only their ``forward`` is replaced for the duration of a
``with`` block (and restored), with the same projections as the library's own forward and the
attention itself done by the chosen package. Shapes: B batch, T tokens, H heads, Dh head dim.
"""
from __future__ import annotations

import contextlib
import importlib
from typing import Callable, Iterator, List

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._models import TIMM

ATTENTION_IMPLS = ("sdpa", "flash", "xformers")
_PACKAGES = {"flash": ("flash_attn", "flash-attn"), "xformers": ("xformers.ops", "xformers")}


def attention_kernel(attn: str) -> Callable[[Tensor, Tensor, Tensor, float], Tensor] | None:
    """The kernel for ``attn`` ("sdpa": None, the model runs its own SDPA). The kernel maps q, k, v
    [B, T, H, Dh] and a scale to the attention output [B, T, H, Dh]. Raises ImportError naming the
    package when it is not installed."""
    if attn not in ATTENTION_IMPLS:
        raise ValueError(f"attn={attn!r}: expected one of {ATTENTION_IMPLS}")
    if attn == "sdpa":
        return None
    module, package = _PACKAGES[attn]
    try:
        lib = importlib.import_module(module)
    except ImportError as exc:
        raise ImportError(f"attn={attn!r} needs the {package} package, which is not installed "
                          f"({exc}); pip install {package}, or use attn='sdpa'") from exc
    if attn == "flash":
        def flash(q, k, v, scale):
            dtype = q.dtype
            if dtype not in (torch.float16, torch.bfloat16):   # FlashAttention runs fp16/bf16 only
                q, k, v = (t.to(torch.bfloat16) for t in (q, k, v))
            return lib.flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=scale).to(dtype)
        return flash

    def xformers(q, k, v, scale):
        return lib.memory_efficient_attention(q, k, v, scale=scale)
    return xformers


def _timm_forward(attn: nn.Module, kernel) -> Callable:
    def forward(x: Tensor, attn_mask=None, is_causal: bool = False) -> Tensor:
        if attn_mask is not None or is_causal:
            raise ValueError("the flash/xformers scorer path supports no attention mask")
        b, t, _ = x.shape
        gate = attn.gate(x).sigmoid() if getattr(attn, "gate", None) is not None else None
        q, k, v = attn.qkv(x).reshape(b, t, 3, attn.num_heads, attn.head_dim).unbind(2)
        q, k = attn.q_norm(q), attn.k_norm(k)          # per-head norms act on Dh: layout-free
        x = kernel(q, k, v, attn.scale).reshape(b, t, attn.num_heads * attn.head_dim)
        x = attn.norm(x)
        if gate is not None:
            x = x * gate
        return attn.proj_drop(attn.proj(x))
    return forward


def _mha_forward(mha: nn.MultiheadAttention, kernel) -> Callable:
    def forward(query: Tensor, key: Tensor = None, value: Tensor = None, need_weights: bool = False,
                attn_mask=None, **unused):
        if attn_mask is not None or need_weights or (key is not None and key is not query):
            raise ValueError("the flash/xformers scorer path supports self-attention without masks "
                             "or weights only")
        h = query if mha.batch_first else query.transpose(0, 1)
        b, t, d = h.shape
        heads = mha.num_heads
        q, k, v = F.linear(h, mha.in_proj_weight, mha.in_proj_bias).view(b, t, 3, heads, d // heads).unbind(2)
        out = mha.out_proj(kernel(q, k, v, (d // heads) ** -0.5).reshape(b, t, d))
        return (out if mha.batch_first else out.transpose(0, 1)), None
    return forward


@contextlib.contextmanager
def fast_attention(modules: List[nn.Module], kind: str, kernel) -> Iterator[None]:
    """Within the block, ``modules`` (timm Attention / nn.MultiheadAttention) run ``kernel``."""
    if kernel is None:
        yield
        return
    make = _timm_forward if kind == TIMM else _mha_forward
    for m in modules:
        m.forward = make(m, kernel)
    try:
        yield
    finally:
        for m in modules:
            m.__dict__.pop("forward", None)

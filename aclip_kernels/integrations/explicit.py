"""The explicit-attention scores that the official A-CLIP code computes: every block runs softmax
attention with materialised [B, H, T, T] maps, the maps of all layers are kept and stacked, averaged
over layers, and ``attn[:, :, 0, P:].mean(heads)`` is the score. This is the reference (and the
memory baseline) of EMAScorer; it is deliberately as memory-hungry as the original.
"""
from __future__ import annotations

import contextlib
from typing import Iterator, List, Sequence, Union

import torch
from torch import Tensor, nn

from . import _models
from ._models import TIMM

__all__ = ["explicit_attention_scores"]


@contextlib.contextmanager
def _collect_maps(tower: nn.Module, kind: str, indices: Sequence[int], maps: List[Tensor]) -> Iterator[None]:
    blocks = _models.blocks(tower, kind)
    handles, saved = [], []
    try:
        for i in indices:
            attn = _models.attention_of(blocks[i], kind, i)
            if kind == TIMM:
                saved.append((attn, attn.fused_attn))
                attn.fused_attn = False                  # timm's explicit path: softmax -> attn_drop
                handles.append(attn.attn_drop.register_forward_hook(
                    lambda m, inp, out: maps.append(out.detach())))
            else:
                def pre(m, args, kwargs):
                    kwargs = dict(kwargs, need_weights=True, average_attn_weights=False)
                    return args, kwargs

                def post(m, args, kwargs, out):
                    maps.append(out[1].detach())        # [B, H, T, T]
                    return out
                handles.append(attn.register_forward_pre_hook(pre, with_kwargs=True))
                handles.append(attn.register_forward_hook(post, with_kwargs=True))
        yield
    finally:
        for h in handles:
            h.remove()
        for attn, fused in saved:
            attn.fused_attn = fused


def explicit_attention_scores(model: nn.Module, images: Tensor, layers: Union[str, Sequence[int]] = "all",
                              return_output: bool = False):
    """images [B, 3, H, W] -> scores [B, N] float32 (and the model output with ``return_output``),
    from explicit attention maps of the chosen layers ("all", "last" or indices), stacked as the
    official code does: ``stack(maps).mean(0)[:, :, 0, P:].mean(1)``."""
    tower, kind = _models.vision_tower(model)
    if kind == _models.HF:
        raise TypeError(f"explicit_attention_scores runs timm / open_clip ViTs; for {type(tower).__name__} "
                        "use the model's own eager maps (set_attn_implementation('eager'), output_attentions=True)")
    run = tower if kind != TIMM else model
    depth = len(_models.blocks(tower, kind))
    indices = list(range(depth)) if layers == "all" else [depth - 1] if layers == "last" else list(layers)
    prefix = _models.num_prefix_tokens(tower, kind)
    maps: List[Tensor] = []
    with torch.no_grad(), _collect_maps(tower, kind, indices, maps):
        output = run(images)
    attn = torch.stack(maps, dim=0).mean(dim=0)
    scores = attn[:, :, 0, prefix:].mean(dim=1).float()
    return (output, scores) if return_output else scores

"""Recognising the ViTs the integrations patch (timm and open_clip), by structure, without
importing either library."""
from __future__ import annotations

import contextlib
from typing import Iterator, List, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

TIMM, OPEN_CLIP = "timm", "open_clip"


def is_timm_vit(module: nn.Module) -> bool:
    return all(hasattr(module, a) for a in ("blocks", "patch_embed", "num_prefix_tokens", "patch_drop"))


def is_open_clip_vit(module: nn.Module) -> bool:
    return all(hasattr(module, a) for a in ("conv1", "positional_embedding", "transformer", "patch_dropout"))


def vision_tower(model: nn.Module) -> Tuple[nn.Module, str]:
    """(tower, kind): a timm VisionTransformer, an open_clip VisionTransformer, or the ``.visual``
    of an open_clip CLIP model."""
    if is_timm_vit(model):
        return model, TIMM
    if is_open_clip_vit(model):
        return model, OPEN_CLIP
    visual = getattr(model, "visual", None)
    if isinstance(visual, nn.Module) and is_open_clip_vit(visual):
        return visual, OPEN_CLIP
    raise TypeError(f"{type(model).__name__} is not a timm VisionTransformer, an open_clip "
                    "VisionTransformer or an open_clip CLIP model with a ViT .visual")


def blocks(tower: nn.Module, kind: str) -> List[nn.Module]:
    return list(tower.blocks) if kind == TIMM else list(tower.transformer.resblocks)


def attention_of(block: nn.Module, kind: str, index: int) -> nn.Module:
    """The block's attention module, checked to be one the scorer knows how to read."""
    attn = getattr(block, "attn", None)
    if kind == TIMM:
        ok = attn is not None and all(hasattr(attn, a) for a in ("qkv", "num_heads", "head_dim", "scale",
                                                                 "q_norm", "k_norm", "proj"))
        ok = ok and type(attn).__name__ == "Attention"
        need = "timm.layers.Attention (a fused qkv projection, no rotary embedding)"
    else:
        ok = isinstance(attn, nn.MultiheadAttention) and attn.in_proj_weight is not None
        need = "nn.MultiheadAttention with a packed in_proj_weight"
    if not ok:
        raise TypeError(f"block {index} has attention {type(attn).__name__}; the scorer supports {need}")
    return attn


def num_prefix_tokens(tower: nn.Module, kind: str) -> int:
    if kind == OPEN_CLIP:
        return 1
    if getattr(tower, "cls_token", None) is None:
        raise ValueError("the timm model has no class token (class_token=False): there is no [CLS] "
                         "row to score with")
    return int(tower.num_prefix_tokens)


def patch_size(tower: nn.Module, kind: str) -> Tuple[int, int]:
    if kind == TIMM:
        return tuple(tower.patch_embed.patch_size)
    ks = tower.conv1.kernel_size
    return (ks, ks) if isinstance(ks, int) else tuple(ks)


def native_grid(tower: nn.Module, kind: str) -> Tuple[int, int]:
    return tuple(tower.patch_embed.grid_size) if kind == TIMM else tuple(tower.grid_size)


def resize_pos_embed(pos: Tensor, old: Tuple[int, int], new: Tuple[int, int], prefix: int) -> Tensor:
    """[P + Ho*Wo, D] -> [P + Hn*Wn, D]: the patch part resized bicubically (antialiased), as
    open_clip's ``resize_pos_embed`` does when it loads a checkpoint at another resolution."""
    tok, img = pos[:prefix], pos[prefix:]
    img = img.reshape(1, old[0], old[1], -1).permute(0, 3, 1, 2)
    img = F.interpolate(img.float(), size=new, mode="bicubic", antialias=True, align_corners=False)
    img = img.permute(0, 2, 3, 1).reshape(new[0] * new[1], -1).to(pos.dtype)
    return torch.cat([tok, img], dim=0)


@contextlib.contextmanager
def input_grid(tower: nn.Module, kind: str, grid: Tuple[int, int]) -> Iterator[None]:
    """Within the block the tower accepts images whose patch grid is ``grid``: timm through its own
    dynamic-image-size path (switched on for the block when the model was built without it),
    open_clip with its positional embedding temporarily resized. Restored on exit."""
    if grid == native_grid(tower, kind):
        yield
        return
    if kind == TIMM:
        if tower.dynamic_img_size:
            yield
            return
        from timm.layers import Format
        pe = tower.patch_embed
        saved = (tower.dynamic_img_size, pe.strict_img_size, pe.flatten, pe.output_fmt)
        tower.dynamic_img_size, pe.strict_img_size, pe.flatten, pe.output_fmt = True, False, False, Format.NHWC
        try:
            yield
        finally:
            tower.dynamic_img_size, pe.strict_img_size, pe.flatten, pe.output_fmt = saved
        return
    param = tower.positional_embedding
    with torch.no_grad():
        resized = resize_pos_embed(param, native_grid(tower, kind), grid, 1)
    tower._parameters["positional_embedding"] = nn.Parameter(resized, requires_grad=False)
    try:
        yield
    finally:
        tower._parameters["positional_embedding"] = param

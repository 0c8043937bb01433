"""Recognising the ViTs the integrations patch (timm ViT / EVA, open_clip, Hugging Face CLIP / SigLIP /
SigLIP2), by structure, without importing any of those libraries."""
from __future__ import annotations

import contextlib
from typing import Iterator, List, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

TIMM, OPEN_CLIP, HF = "timm", "open_clip", "hf"
HF_VISION_TYPES = ("clip_vision_model", "siglip_vision_model", "siglip2_vision_model")


def is_timm_vit(module: nn.Module) -> bool:
    return all(hasattr(module, a) for a in ("blocks", "patch_embed", "num_prefix_tokens", "patch_drop"))


def is_open_clip_vit(module: nn.Module) -> bool:
    return all(hasattr(module, a) for a in ("conv1", "positional_embedding", "transformer", "patch_dropout"))


def is_eva(module: nn.Module) -> bool:
    """timm ``Eva`` (EVA-CLIP, EVA-02): a timm ViT whose blocks take a rotary embedding."""
    return is_timm_vit(module) and hasattr(module, "rope") and type(module).__name__ == "Eva"


def is_hf_vision(module: nn.Module) -> bool:
    """A transformers CLIPVisionModel / SiglipVisionModel / Siglip2VisionModel (5.x layout)."""
    model_type = getattr(getattr(module, "config", None), "model_type", None)
    return model_type in HF_VISION_TYPES and hasattr(module, "embeddings") and hasattr(module, "encoder")


def vision_tower(model: nn.Module) -> Tuple[nn.Module, str]:
    """(tower, kind): a timm VisionTransformer / Eva, an open_clip VisionTransformer, the ViT of an
    open_clip CLIP model (``.visual``, or ``.visual.trunk`` for timm towers such as SigLIP), or the
    vision model of a transformers CLIP / SigLIP / SigLIP2 model (itself or its ``.vision_model``)."""
    if is_timm_vit(model):
        return model, TIMM
    if is_open_clip_vit(model):
        return model, OPEN_CLIP
    if is_hf_vision(model):
        return model, HF
    visual = getattr(model, "visual", None)
    if isinstance(visual, nn.Module) and is_open_clip_vit(visual):
        return visual, OPEN_CLIP
    trunk = getattr(visual, "trunk", None)
    if isinstance(trunk, nn.Module) and is_timm_vit(trunk):
        return trunk, TIMM
    vision = getattr(model, "vision_model", None)
    if isinstance(vision, nn.Module) and is_hf_vision(vision):
        return vision, HF
    raise TypeError(f"{type(model).__name__} is not a timm VisionTransformer / Eva, an open_clip "
                    "VisionTransformer or CLIP model with a ViT .visual, or a transformers "
                    "CLIP / SigLIP / SigLIP2 (vision) model")


def runner(model: nn.Module, tower: nn.Module) -> nn.Module:
    """The module whose forward takes the images: the timm model itself, the open_clip
    ``.visual`` (with its projection / head), or the transformers vision model."""
    visual = getattr(model, "visual", None)
    if isinstance(visual, nn.Module) and tower in (visual, getattr(visual, "trunk", None)):
        return visual
    return model if tower is model or not is_hf_vision(tower) else tower


def blocks(tower: nn.Module, kind: str) -> List[nn.Module]:
    if kind == HF:
        return list(tower.encoder.layers)
    return list(tower.blocks) if kind == TIMM else list(tower.transformer.resblocks)


def attention_of(block: nn.Module, kind: str, index: int) -> nn.Module:
    """The block's attention module, checked to be one the scorer knows how to read."""
    attn = getattr(block, "self_attn" if kind == HF else "attn", None)
    if kind == HF:
        ok = attn is not None and all(hasattr(attn, a) for a in ("q_proj", "k_proj", "num_heads", "head_dim", "scale"))
        need = "a transformers attention with q_proj / k_proj (CLIPAttention, SiglipAttention)"
    elif type(attn).__name__ == "EvaAttention":
        ok = all(hasattr(attn, a) for a in ("qkv", "q_proj", "k_proj", "q_bias", "k_bias", "q_norm", "k_norm",
                                            "num_heads", "head_dim", "scale", "num_prefix_tokens"))
        need = "timm.models.eva.EvaAttention"
    elif kind == TIMM:
        ok = attn is not None and all(hasattr(attn, a) for a in ("qkv", "num_heads", "head_dim", "scale",
                                                                 "q_norm", "k_norm", "proj"))
        ok = ok and type(attn).__name__ == "Attention"
        need = "timm.layers.Attention (a fused qkv projection, no rotary embedding) or EvaAttention"
    else:
        ok = isinstance(attn, nn.MultiheadAttention) and attn.in_proj_weight is not None
        need = "nn.MultiheadAttention with a packed in_proj_weight"
    if not ok:
        raise TypeError(f"block {index} has attention {type(attn).__name__}; the scorer supports {need}")
    return attn


def has_class_token(tower: nn.Module, kind: str) -> bool:
    if kind == HF:
        return hasattr(tower.embeddings, "class_embedding")
    return kind == OPEN_CLIP or getattr(tower, "cls_token", None) is not None


def prefix_tokens(tower: nn.Module, kind: str) -> int:
    """The tokens before the patches: [CLS] and register tokens (0 for SigLIP)."""
    if kind == HF:
        return int(has_class_token(tower, kind))
    return 1 if kind == OPEN_CLIP else int(tower.num_prefix_tokens)


def num_prefix_tokens(tower: nn.Module, kind: str) -> int:
    """``prefix_tokens``, for a tower that has a [CLS] token (ValueError otherwise)."""
    if not has_class_token(tower, kind):
        raise ValueError(f"the {kind} model has no class token: there is no [CLS] row to score with")
    return prefix_tokens(tower, kind)


def probe_of(tower: nn.Module, kind: str):
    """The attention-pooling probe: timm ``attn_pool`` (AttentionPoolLatent) or the transformers
    SigLIP head's ``nn.MultiheadAttention``; None when the tower has none."""
    if kind == TIMM:
        pool = getattr(tower, "attn_pool", None)
        ok = pool is not None and all(hasattr(pool, a) for a in ("latent", "q", "kv", "q_norm", "k_norm", "scale"))
        return pool if ok else None
    if kind == HF and getattr(tower, "use_head", False):
        attn = getattr(tower.head, "attention", None)
        return attn if isinstance(attn, nn.MultiheadAttention) and attn.in_proj_weight is not None else None
    return None


def patch_size(tower: nn.Module, kind: str) -> Tuple[int, int]:
    if kind == HF:
        return (int(tower.config.patch_size),) * 2
    if kind == TIMM:
        return tuple(tower.patch_embed.patch_size)
    ks = tower.conv1.kernel_size
    return (ks, ks) if isinstance(ks, int) else tuple(ks)


def native_grid(tower: nn.Module, kind: str) -> Tuple[int, int]:
    if kind == HF:
        config = tower.config
        if getattr(config, "image_size", None) is None:         # SigLIP2: its position-embedding grid
            return (int(round(config.num_patches ** 0.5)),) * 2
        return (int(config.image_size) // int(config.patch_size),) * 2
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
    if grid == native_grid(tower, kind) or kind == HF:     # HF: interpolate_pos_encoding=True
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

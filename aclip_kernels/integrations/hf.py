"""Drop-in attentive masking for Hugging Face transformers CLIP, SigLIP and SigLIP2 (5.x).

``patch_hf_clip(model)`` attaches an ``AttentivePatchDropout`` to the vision model (as
``aclip_patch_dropout``, no parameters: the state dict is unchanged) and a forward hook on its
``embeddings`` that passes their output [B, P+N, D] (patch + position embeddings, P = 1 [CLS] for
CLIP, 0 for SigLIP) through it: before ``pre_layrnorm`` (CLIP), before the encoder (SigLIP).
The per-step inputs come through the same ``masking(model, ...)`` block as for timm / open_clip:

    with aclip_kernels.masking(model, scores=scores, boxes=boxes, keep=0.5, block=2):
        out = model(input_ids=ids, pixel_values=views)     # the encoder sees P + n*b*b tokens

Outside a ``masking`` block, and in eval mode, the hook returns the embeddings themselves: the
output is bit-identical to the unpatched model's. SigLIP2 (NaFlex: patchified ``pixel_values``
[B, L, C*p*p], ``spatial_shapes``, ``pixel_attention_mask``) is masked when every image of the
batch has the same grid and no padding (what ``siglip2_inputs`` makes); padded or mixed-grid
batches are refused inside a masking block. transformers is never imported here.
"""
from __future__ import annotations

from typing import Dict

import torch
from torch import Tensor, nn

from . import _models
from .patch_dropout import AttentivePatchDropout

__all__ = ["patch_hf_clip", "siglip2_inputs"]

ATTRIBUTE = "aclip_patch_dropout"


class _HFPatchDropout(AttentivePatchDropout):
    """AttentivePatchDropout driven by hooks on a transformers vision model."""

    def embeddings_hook(self, module: nn.Module, args, output: Tensor) -> Tensor:
        return self(output)

    def siglip2_pre_hook(self, module: nn.Module, args, kwargs):
        """Inside a masking block (training): check the NaFlex batch is one unpadded grid, take
        that grid, and drop the all-ones ``pixel_attention_mask`` (its length would no longer
        match the kept tokens; the encoder and the head then attend to every kept token)."""
        if not self.training or self._masking is None:
            return None
        names = ("pixel_values", "pixel_attention_mask", "spatial_shapes")
        bound = dict(zip(names, args), **kwargs)
        shapes, mask = bound.get("spatial_shapes"), bound.get("pixel_attention_mask")
        if shapes is None:
            raise ValueError("masking a Siglip2VisionModel needs spatial_shapes [B, 2]")
        shapes = torch.as_tensor(shapes)
        grid = tuple(int(v) for v in shapes[0])
        length = bound["pixel_values"].shape[1]
        if not bool((shapes == shapes[0]).all()) or grid[0] * grid[1] != length or \
                (mask is not None and not bool(torch.as_tensor(mask).all())):
            raise ValueError(f"masking a Siglip2VisionModel needs one patch grid for the whole batch and no "
                             f"padding (spatial_shapes all equal, h*w == {length} patches, pixel_attention_mask "
                             f"all ones); got spatial_shapes {shapes.tolist()}. Resize the views to one size, "
                             "e.g. with aclip_kernels.integrations.hf.siglip2_inputs")
        self.grid = grid
        bound["pixel_attention_mask"] = None
        return (), bound


def patch_hf_clip(model: nn.Module) -> nn.Module:
    """Install attentive masking in a transformers ``CLIPModel`` / ``CLIPVisionModel`` /
    ``CLIPVisionModelWithProjection`` / ``SiglipModel`` / ``SiglipVisionModel`` / ``Siglip2Model`` /
    ``Siglip2VisionModel`` (or any model whose ``.vision_model`` is one); in place, idempotent.
    Returns ``model``. Masking applies after the patch + position embeddings."""
    tower, kind = _models.vision_tower(model)
    if kind != _models.HF:
        raise TypeError(f"{type(model).__name__} is not a transformers CLIP / SigLIP / SigLIP2 model; "
                        "use patch_timm_vit or patch_open_clip")
    if isinstance(getattr(tower, ATTRIBUTE, None), AttentivePatchDropout):
        return model
    dropout = _HFPatchDropout(0.0, _models.prefix_tokens(tower, kind), grid=_models.native_grid(tower, kind))
    dropout.train(tower.training)
    setattr(tower, ATTRIBUTE, dropout)
    # bound methods of the submodule: deepcopy (make_ema) re-binds them to the copy's module
    tower.embeddings.register_forward_hook(dropout.embeddings_hook)
    if tower.config.model_type == "siglip2_vision_model":
        tower.register_forward_pre_hook(dropout.siglip2_pre_hook, with_kwargs=True)
    return model


def siglip2_inputs(images: Tensor, patch_size: int) -> Dict[str, Tensor]:
    """images [B, C, H, W] (H, W multiples of ``patch_size``) -> the Siglip2 vision inputs of one
    unpadded grid: ``pixel_values`` [B, h*w, p*p*C] (patches row-major, each patch (row, col,
    channel) as the Siglip2 image processor lays it out), ``pixel_attention_mask`` [B, h*w] ones,
    ``spatial_shapes`` [B, 2] = (h, w)."""
    if not isinstance(images, Tensor) or images.dim() != 4:
        raise ValueError(f"images must be [B, C, H, W]; got {getattr(images, 'shape', type(images).__name__)}")
    b, c, height, width = images.shape
    p = int(patch_size)
    if height % p or width % p:
        raise ValueError(f"images {tuple(images.shape)}: H and W must be multiples of patch_size={p}")
    h, w = height // p, width // p
    patches = images.reshape(b, c, h, p, w, p).permute(0, 2, 4, 3, 5, 1).reshape(b, h * w, p * p * c)
    return {"pixel_values": patches,
            "pixel_attention_mask": torch.ones(b, h * w, dtype=torch.int32, device=images.device),
            "spatial_shapes": torch.tensor([[h, w]] * b, dtype=torch.int64, device=images.device)}

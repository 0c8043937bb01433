"""aclip_kernels: fused kernels for A-CLIP's attentive token masking.

Public ops: ``cls_attention``, ``attentive_mask``, ``random_mask`` (semantics: docs/design.md,
sections 3-5; ``aclip_kernels.reference`` is their pure-PyTorch definition).
"""
from . import reference
from ._library import compiled_backends
from .backends import available_backends, resolve_backend
from .ops import attentive_mask, cls_attention, random_mask
from .integrations import (AttentivePatchDropout, AttentivePatchDropoutWithIndices, EMAScorer, cosine_momentum,
                           ema_update_, make_ema, masking, patch_hf_clip, patch_open_clip, patch_timm_vit)

__version__ = "0.1.0"

__all__ = ["cls_attention", "attentive_mask", "random_mask", "reference", "compiled_backends",
           "available_backends", "resolve_backend"]
__all__ += ["EMAScorer", "AttentivePatchDropout", "AttentivePatchDropoutWithIndices", "patch_timm_vit",
            "patch_open_clip", "patch_hf_clip", "masking", "ema_update_", "cosine_momentum", "make_ema"]

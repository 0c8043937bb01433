"""Model integrations: EMA scoring without attention maps, drop-in masking for timm (ViT, Eva) /
open_clip / transformers (CLIP, SigLIP, SigLIP2) ViTs, and EMA utilities. The public names are
re-exported by ``aclip_kernels``."""
from .ema import cosine_momentum, ema_update_, make_ema
from .explicit import explicit_attention_scores
from .hf import patch_hf_clip
from .patch_dropout import (AttentivePatchDropout, AttentivePatchDropoutWithIndices, MaskingState, masking,
                            patch_open_clip, patch_timm_vit)
from .scorer import EMAScorer

__all__ = ["EMAScorer", "AttentivePatchDropout", "AttentivePatchDropoutWithIndices", "MaskingState", "masking",
           "patch_timm_vit", "patch_open_clip", "patch_hf_clip", "ema_update_", "cosine_momentum", "make_ema",
           "explicit_attention_scores"]

"""The public ops, one module each: argument checks, backend dispatch, torch.library registration."""
from .attentive_mask import attentive_mask
from .cls_attention import cls_attention
from .random_mask import random_mask

__all__ = ["cls_attention", "attentive_mask", "random_mask"]

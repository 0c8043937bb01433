"""The public ops, one module each, which tells the op's whole story: its torch.library schema (defined
once, there), fake kernel, autograd, Triton op and backend dispatch. Argument checks: ``_checks``."""
from .attentive_mask import attentive_mask
from .cls_attention import cls_attention
from .random_mask import random_mask

__all__ = ["cls_attention", "attentive_mask", "random_mask"]

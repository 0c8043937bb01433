"""Triton kernels of the ops (the ``triton`` backend), registered as torch.library triton ops:
``aclip_kernels::cls_attention_triton``, ``aclip_kernels::attentive_mask_triton`` and
``aclip_kernels::attentive_mask_backward_triton`` (the schemas of csrc/ops.cpp).

On CPU tensors they run only under ``TRITON_INTERPRET=1``, which must be set before this package
is imported.
"""
from .attentive_mask import attentive_mask
from .cls_attention import cls_attention

__all__ = ["cls_attention", "attentive_mask"]

"""Triton kernels of the ops (the ``triton`` backend) and their launchers. The ops that run them
(``aclip_kernels::<op>_triton``) are registered in aclip_kernels/ops/, with the schemas defined there.

On CPU tensors they run only under ``TRITON_INTERPRET=1``, which must be set before this package
is imported (``import aclip_kernels`` imports it when triton is installed).
"""
from .attentive_mask import launch_attentive_mask, launch_attentive_mask_backward
from .cls_attention import launch_cls_attention

__all__ = ["launch_cls_attention", "launch_attentive_mask", "launch_attentive_mask_backward"]

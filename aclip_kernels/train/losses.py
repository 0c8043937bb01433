"""The contrastive and self-distillation losses, distributed-exact.

Every loss takes this rank's rows; the contrastive ones gather the other ranks' rows with a
gradient-carrying all-gather and use per-rank labels (``arange(b) + rank * b``), so the mean of the
ranks' losses (and, under DDP's gradient averaging, the gradient) equals the single-process loss on
the whole global batch.

Fixed defect of the published A-CLIP code: its SimCLR term is computed between view 1 and itself,
which makes every positive pair trivial (the loss only pushes apart different images). Here
``simclr_loss`` takes the two differently augmented online views, z1 from view 1 and z2 from
view 2, and refuses the same tensor twice.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .distributed import gather_with_grad, rank

__all__ = ["clip_loss", "simclr_loss", "byol_loss"]


def _labels(b: int, device) -> Tensor:
    return torch.arange(b, device=device) + rank() * b


def clip_loss(image: Tensor, text: Tensor, logit_scale: Tensor) -> Tensor:
    """Symmetric InfoNCE. image, text: [b, E] L2-normalised; logit_scale: scalar (already exp'd).
    Returns the mean over this rank's rows of (CE(image->all texts) + CE(text->all images)) / 2."""
    all_image, all_text = gather_with_grad(image), gather_with_grad(text)
    labels = _labels(image.shape[0], image.device)
    logits_i = logit_scale * image @ all_text.t()
    logits_t = logit_scale * text @ all_image.t()
    return (F.cross_entropy(logits_i.float(), labels) + F.cross_entropy(logits_t.float(), labels)) / 2


def simclr_loss(z1: Tensor, z2: Tensor, tau: float = 0.1) -> Tensor:
    """SimCLR NT-Xent between two views (SLIP's formulation). z1, z2: [b, E] embeddings of view 1
    and view 2 of the same b images (normalised here). Positives: (z1[i], z2[i]); negatives: every
    other row of both views across all ranks; each row's self-similarity is masked out."""
    if z1 is z2:
        raise ValueError("simclr_loss needs two different views (z1 is z2: the published "
                         "self-comparison defect)")
    z1, z2 = F.normalize(z1.float(), dim=-1), F.normalize(z2.float(), dim=-1)
    all1, all2 = gather_with_grad(z1), gather_with_grad(z2)
    labels = _labels(z1.shape[0], z1.device)
    self_mask = F.one_hot(labels, all1.shape[0]).to(z1.dtype) * 1e9
    l_aa = z1 @ all1.t() / tau - self_mask
    l_bb = z2 @ all2.t() / tau - self_mask
    l_ab = z1 @ all2.t() / tau
    l_ba = z2 @ all1.t() / tau
    return (F.cross_entropy(torch.cat([l_ab, l_aa], 1), labels)
            + F.cross_entropy(torch.cat([l_ba, l_bb], 1), labels)) / 2


def byol_loss(prediction: Tensor, target: Tensor) -> Tensor:
    """BYOL regression: mean over rows of 2 - 2 cos(prediction, target); target gets no gradient.
    prediction: [b, E] online predictor output; target: [b, E] EMA projector output."""
    p = F.normalize(prediction.float(), dim=-1)
    t = F.normalize(target.detach().float(), dim=-1)
    return (2 - 2 * (p * t).sum(-1)).mean()

"""AdamW with open_clip's weight-decay exclusions, and the warmup + cosine learning-rate schedule."""
from __future__ import annotations

import math

import torch
from torch import nn

__all__ = ["param_groups", "make_optimizer", "warmup_cosine", "make_scheduler"]


def param_groups(model: nn.Module, weight_decay: float):
    """Two groups: decayed (matrices, embeddings) and not decayed (biases, norms, logit_scale:
    every parameter with ndim < 2 or a name containing "bias", "ln", "bn", "norm" or "logit_scale")."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        lower = name.lower()
        exclude = p.ndim < 2 or any(s in lower for s in ("bias", "ln", "bn", "norm", "logit_scale"))
        (no_decay if exclude else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def make_optimizer(model: nn.Module, lr: float = 5e-4, weight_decay: float = 0.5,
                   betas=(0.9, 0.98), eps: float = 1e-8) -> torch.optim.AdamW:
    fused = next(model.parameters()).is_cuda
    return torch.optim.AdamW(param_groups(model, weight_decay), lr=lr, betas=betas, eps=eps,
                             fused=fused or None)


def warmup_cosine(step: int, warmup: int, total: int, min_ratio: float = 0.0) -> float:
    """lr multiplier: linear (step+1)/warmup during warmup, then cosine from 1 to min_ratio."""
    if step < warmup:
        return (step + 1) / warmup
    t = (step - warmup) / max(1, total - warmup)
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, t)))


def make_scheduler(optimizer, warmup: int, total: int) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: warmup_cosine(s, warmup, total))

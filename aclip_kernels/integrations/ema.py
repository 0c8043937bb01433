"""EMA (momentum) encoder utilities: the multi-tensor update, the cosine momentum schedule, the copy."""
from __future__ import annotations

import copy
import math
from typing import Dict, List, Tuple

import torch
from torch import Tensor, nn

__all__ = ["ema_update_", "cosine_momentum", "make_ema"]


def _pairs(ema_named: Dict[str, Tensor], named: Dict[str, Tensor], what: str) -> List[Tuple[Tensor, Tensor]]:
    if ema_named.keys() != named.keys():
        missing = sorted(set(named) - set(ema_named))[:3]
        extra = sorted(set(ema_named) - set(named))[:3]
        raise ValueError(f"ema_update_: the EMA model's {what} differ from the model's "
                         f"(missing in EMA: {missing}, extra in EMA: {extra})")
    pairs = []
    for name, e in ema_named.items():
        p = named[name]
        if e.shape != p.shape:
            raise ValueError(f"ema_update_: {what[:-1]} {name!r} is {list(e.shape)} in the EMA model "
                             f"but {list(p.shape)} in the model")
        pairs.append((e, p))
    return pairs


@torch.no_grad()
def ema_update_(ema_model: nn.Module, model: nn.Module, momentum: float) -> None:
    """In place: ``ema = momentum * ema + (1 - momentum) * model`` for every parameter and every
    floating-point buffer (matched by name), with ``torch._foreach_lerp_`` (one multi-tensor
    kernel per device/dtype group). Non-floating buffers (e.g. BatchNorm's step count) are copied.
    """
    momentum = float(momentum)
    if not 0.0 <= momentum <= 1.0:
        raise ValueError(f"momentum={momentum} must be in [0, 1]")
    pairs = _pairs(dict(ema_model.named_parameters()), dict(model.named_parameters()), "parameters")
    buffers = _pairs(dict(ema_model.named_buffers()), dict(model.named_buffers()), "buffers")
    pairs += [(e, p) for e, p in buffers if e.is_floating_point()]
    copies = [(e, p) for e, p in buffers if not e.is_floating_point()]

    # group by (device, dtype) of the EMA tensor; the source is converted when it differs
    groups: Dict[Tuple[torch.device, torch.dtype], Tuple[List[Tensor], List[Tensor]]] = {}
    for e, p in pairs:
        dst, src = groups.setdefault((e.device, e.dtype), ([], []))
        dst.append(e)
        src.append(p.detach().to(device=e.device, dtype=e.dtype))
    for dst, src in groups.values():
        torch._foreach_lerp_(dst, src, 1.0 - momentum)
    for e, p in copies:
        e.copy_(p)


def cosine_momentum(step: int, total: int, base: float = 0.996) -> float:
    """BYOL's schedule: ``1 - (1 - base) * (cos(pi * step / total) + 1) / 2``; ``base`` at step 0,
    1 at ``step >= total`` (step is clamped to [0, total])."""
    if total <= 0:
        return 1.0
    t = min(max(step, 0), total) / total
    return 1.0 - (1.0 - base) * (math.cos(math.pi * t) + 1.0) / 2.0


def make_ema(model: nn.Module) -> nn.Module:
    """A deep copy of ``model`` for the EMA encoder: no gradients (requires_grad False) and in eval
    mode (dropout, drop-path and patch dropout off)."""
    ema = copy.deepcopy(model)
    ema.requires_grad_(False)
    return ema.eval()

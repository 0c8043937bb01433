"""One optimiser step of the training loop, as reusable functions.

``build_step(cfg, device)`` makes the trainable state exactly as ``train`` does (same seed, model,
EMA copy, scorer, patching, optimiser, schedule); ``micro_step`` runs one micro-batch (EMA scoring
and BYOL targets without gradient, the online forward under the run's autocast, backward);
``apply_update`` is the rest of an optimiser step (grad clip, AdamW, lr schedule, logit-scale clamp,
EMA update); ``train_step`` is both, for one micro-batch per step on one process. ``train``
(loop.py) is built from these functions, and ``benchmarks/bench_step.py`` times them.

Each phase runs inside a ``torch.profiler.record_function`` range named ``step/ema_scoring``,
``step/forward``, ``step/backward``, ``step/optimizer`` and ``step/ema_update`` (nothing is recorded
unless a profiler is running).
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Any, Dict, Optional, Tuple

import numpy as np
import torch
from torch import Tensor
from torch.profiler import record_function

from .. import integrations as ak
from .model import TrainModel, build_clip, image_size_of
from .optim import make_optimizer, make_scheduler

__all__ = ["StepState", "build_step", "micro_step", "apply_update", "train_step"]


@dataclass
class StepState:
    """Everything one run trains with. ``cfg`` is the run's ``TrainConfig``."""
    cfg: Any
    device: torch.device
    clip: torch.nn.Module
    tokenizer: Any
    size: int
    model: TrainModel
    ema: Optional[torch.nn.Module]
    scorer: Any
    optimizer: torch.optim.Optimizer
    scheduler: Any
    bf16: bool
    aclip: bool

    def autocast(self):
        return torch.autocast(self.device.type, dtype=torch.bfloat16) if self.bf16 else contextlib.nullcontext()


def build_step(cfg, device) -> StepState:
    """Model, EMA, scorer, optimiser and schedule of ``cfg`` on ``device`` (seeded with cfg.seed:
    identical initial weights on every rank)."""
    device = torch.device(device)
    bf16 = cfg.precision == "bf16" or (cfg.precision == "auto" and device.type == "cuda")  # bf16: no loss scaling
    aclip = cfg.method in ("aclip", "aclip-eff")
    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed)
    clip, tokenizer = build_clip(cfg.model, cfg.image_size)
    size = image_size_of(clip)
    model = TrainModel(clip, cfg.method, cfg.ssl_dim, cfg.ssl_hidden, cfg.keep, cfg.block)
    ema = scorer = None
    if aclip:
        ema = ak.make_ema(model.ema_source())          # before patching: the EMA keeps every token
        scorer = ak.EMAScorer(ema.visual, layers=cfg.ema_layers,
                              resolution=size // 2 if cfg.method == "aclip-eff" else None)
    if cfg.method in ("flip", "aclip", "aclip-eff"):
        ak.patch_open_clip(clip)
    model.to(device)
    if ema is not None:
        ema.to(device)
    optimizer = make_optimizer(model, cfg.lr, cfg.weight_decay, tuple(cfg.betas))
    warmup = cfg.warmup if cfg.warmup is not None else max(1, cfg.steps // 20)
    scheduler = make_scheduler(optimizer, warmup, cfg.steps)
    return StepState(cfg, device, clip, tokenizer, size, model, ema, scorer, optimizer, scheduler, bf16, aclip)


def micro_step(state: StepState, net, batch: Dict[str, Any], accum: int = 1,
               no_sync: bool = False) -> Dict[str, Tensor]:
    """One micro-batch (already on the device): EMA scores and targets (aclip*), the online
    forward of ``net`` (the TrainModel, or its DDP / compiled wrapper), backward of loss / accum.
    ``no_sync``: skip DDP's gradient all-reduce (non-final micro-steps). Returns the loss terms."""
    scores = target = None
    if state.aclip:
        with record_function("step/ema_scoring"), torch.no_grad(), state.autocast():
            ema_feats, scores = state.scorer.forward_with_output(batch["ema"])
            target = state.ema.projector(ema_feats).float()
        scores = scores.float()
    with net.no_sync() if no_sync else contextlib.nullcontext():
        with record_function("step/forward"), state.autocast():
            out = net(batch, scores, target)
        with record_function("step/backward"):
            (out["loss"] / accum).backward()
    return out


def apply_update(state: StepState, step: int) -> Tuple[float, Optional[float]]:
    """The optimiser part of step ``step`` (0-based): grad clip, AdamW, zero_grad, lr schedule,
    logit-scale clamp (open_clip's [0, ln 100]), EMA update with the cosine momentum (aclip*).
    Returns (the lr used, the EMA momentum or None)."""
    cfg = state.cfg
    with record_function("step/optimizer"):
        if cfg.grad_clip:
            torch.nn.utils.clip_grad_norm_(state.model.parameters(), cfg.grad_clip)
        state.optimizer.step()
        state.optimizer.zero_grad(set_to_none=True)
        lr = state.scheduler.get_last_lr()[0]
        state.scheduler.step()
        with torch.no_grad():
            state.clip.logit_scale.clamp_(0, math.log(100))
    momentum = None
    if state.aclip:
        with record_function("step/ema_update"):
            momentum = ak.cosine_momentum(step, cfg.steps, cfg.ema_momentum)
            ak.ema_update_(state.ema, state.model.ema_source(), momentum)
    return lr, momentum


def train_step(state: StepState, batch: Dict[str, Any], step: int) -> Dict[str, Tensor]:
    """A whole optimiser step with one micro-batch on one process (no loss reduction or
    finiteness check: those are the loop's)."""
    out = micro_step(state, state.model, batch)
    apply_update(state, step)
    return out

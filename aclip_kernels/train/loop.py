"""The training loop: one function, ``train(cfg)``, for every method, one process or torchrun/DDP.

Per optimiser step: ``cfg.accum`` micro-batches (the global batch split across ranks and
micro-steps); for aclip*, the EMA image tower scores the EMA view and the EMA BYOL projector makes
the targets (no gradient); the online forward runs under bf16 autocast on GPU; DDP averages the
gradients (no sync on the non-final micro-steps); then a finiteness check on the global loss,
AdamW, the lr schedule, the logit-scale clamp (open_clip's [0, ln 100]) and the EMA update with the
cosine momentum (0.996 -> 1).

Checkpoints. A periodic checkpoint of step k is written during step k + 1, once that step's loss,
computed from the weights of step k, is finite and before the optimiser changes them: a checkpoint
never holds weights that have already diverged. Any checkpoint is written only from finite weights
and optimiser state. A non-finite loss (or state) raises ``NonFiniteLoss`` before the optimiser
touches anything; its message names the last checkpoint, which resumes. SIGTERM (or
``stop_after``) makes the loop write a checkpoint at the end of the current step and return; a
SIGTERM during the start-up (model, resume, data) raises ``Stopped`` at once. At start-up, the
temporary files of an interrupted checkpoint write are removed, and ``metrics.jsonl`` is cut back
to the step the run starts from.
"""
from __future__ import annotations

import math
import os
import signal
import sys
import threading
import time
from dataclasses import asdict, dataclass
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import torch

from . import checkpoint as ckpt
from . import metrics
from .augment import make_transform
from .data import make_eval_set, make_train_loader
from .distributed import all_reduce_mean, all_reduce_sum, barrier, init_distributed
from .errors import CheckpointError, NonFiniteLoss, Stopped, UserError
from .evaluate import evaluate
from .model import METHODS
from .step import StepState, apply_update, build_step, micro_step

__all__ = ["TrainConfig", "NonFiniteLoss", "train", "CHECKPOINT", "METRICS"]

CHECKPOINT = "checkpoint.pt"
METRICS = "metrics.jsonl"
# a resumed run must match the checkpoint in these
RESUME_KEYS = ("method", "model", "data", "batch_size", "accum", "seed", "image_size", "ssl_dim", "ssl_hidden")


@dataclass
class TrainConfig:
    """Every option of a run (the CLI flags, see ``__main__.py``)."""
    method: str = "aclip"
    model: str = "ACLIP-Tiny"
    data: str = "embedded"
    val_data: Optional[str] = None          # default: the embedded val split when data == embedded
    steps: int = 400
    batch_size: int = 64                    # global, per optimiser step
    accum: int = 1                          # micro-batches per optimiser step
    lr: float = 5e-4
    weight_decay: float = 0.5
    betas: tuple = (0.9, 0.98)
    warmup: Optional[int] = None            # default: 5% of steps
    grad_clip: Optional[float] = None
    image_size: Optional[int] = None        # default: the model config's
    keep: float = 0.5
    block: int = 2
    ema_crop: str = "zoom"                  # A-CLIP EMA crop: zoom (published zoom-out, fixed) | union
    ema_momentum: float = 0.996
    ema_layers: str = "all"
    ssl_dim: int = 256
    ssl_hidden: int = 1024
    seed: int = 0
    output_dir: str = "runs/train"
    resume: bool = False
    ckpt_every: int = 200
    stop_after: Optional[int] = None        # run at most this many steps in this process, then checkpoint
    workers: int = 1                        # DataLoader worker processes (map-style data)
    threads: int = 0                        # CPU intra-op threads; 0: cores - workers (at least 1)
    device: str = "auto"
    precision: str = "auto"                 # auto (bf16 on GPU, fp32 on CPU) | bf16 | fp32
    compile: bool = False
    classes: int = 10                       # embedded set
    samples_per_class: int = 200            # embedded train set
    val_per_class: int = 20                 # embedded val set
    embedded_size: Optional[int] = None     # embedded images' pixels (default: 2x the model's)
    csv_img_key: str = "filepath"
    csv_caption_key: str = "title"
    val_limit: Optional[int] = 2000
    log_every: int = 10
    evaluate: bool = True
    save_masks: bool = False
    progress: bool = True
    quiet: bool = False


class _Stop:
    """SIGTERM handling (main thread only). Until ``defer()`` a SIGTERM raises ``Stopped`` (start-up:
    nothing to save yet); after it, it sets ``flag`` and the loop checkpoints at the end of the step.
    ``restore()`` puts the previous handler back. Forked DataLoader workers inherit the handler and
    only set the flag: the main process decides."""

    def __init__(self):
        self.flag, self.deferred, self.installed, self.previous = False, False, False, None
        self.pid = os.getpid()

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self.previous = signal.signal(signal.SIGTERM, self._handle)
            self.installed = True
        return self

    def _handle(self, signum, frame):
        self.flag = True
        if not self.deferred and os.getpid() == self.pid:
            raise Stopped("SIGTERM during start-up, before the first step: nothing to save")

    def defer(self) -> None:
        self.deferred = True

    def restore(self) -> None:
        if self.installed:
            signal.signal(signal.SIGTERM, signal.SIG_DFL if self.previous is None else self.previous)
            self.installed = False

    def __exit__(self, *exc):
        self.restore()


def _to(batch: Dict[str, Any], device) -> Dict[str, Any]:
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def _unwrap(model):
    model = getattr(model, "module", model)
    return getattr(model, "_orig_mod", model)


def _log(cfg: TrainConfig, record: Dict[str, Any], rank: int) -> None:
    if rank == 0:
        metrics.append(os.path.join(cfg.output_dir, METRICS), record)


def train(cfg: TrainConfig) -> Dict[str, Any]:
    """Run (or resume) a training run. Returns {"status": "done" | "stopped", "step", "losses"
    (this process's per-step global losses, in step order), "metrics", "mean_step_time",
    "skipped", "checkpoint"}. Raises NonFiniteLoss on a NaN/inf loss, ``UserError`` for a config,
    data source or checkpoint that cannot work, ``Stopped`` on SIGTERM before the first step."""
    if cfg.method not in METHODS:
        raise UserError(f"--method {cfg.method!r} must be one of {METHODS}")
    with _Stop() as stop:                       # before the slow start-up
        info = init_distributed(cfg.device)
        world, device = info.world_size, info.device
        if cfg.batch_size % (cfg.accum * world):
            raise UserError(f"--batch-size {cfg.batch_size} must be divisible by accum ({cfg.accum}) x "
                            f"world size ({world})")
        micro = cfg.batch_size // cfg.accum
        threads_before = torch.get_num_threads()
        if device.type == "cpu":
            # small CPU ops pay a parallel-region barrier per thread: leave a core to the data worker
            cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
            torch.set_num_threads(cfg.threads or max(1, (cores or 1) // world - cfg.workers))
        try:
            return _train(cfg, info, micro, stop)
        finally:
            torch.set_num_threads(threads_before)


def _check_fits(cfg: TrainConfig, trainer: StepState) -> None:
    """The flags that depend on the model's patch grid."""
    grid = getattr(trainer.clip.visual, "grid_size", None)
    if grid is None:
        return
    if min(grid) < 1:
        raise UserError(f"image size {trainer.size} is smaller than a patch of {cfg.model}")
    if trainer.aclip and (grid[0] % cfg.block or grid[1] % cfg.block):
        raise UserError(f"--block {cfg.block} must divide the {grid[0]}x{grid[1]} patch grid of {cfg.model} "
                        f"at {trainer.size} px")


def _resume(cfg: TrainConfig, trainer: StepState, path: str, rank: int, world: int) -> Tuple[int, int, int]:
    """Load the checkpoint ``path`` into ``trainer`` and this rank's RNGs; returns (step, data
    position, skipped samples)."""
    state = ckpt.load(path)
    saved = state["config"]
    for key in RESUME_KEYS:
        if key in saved and saved[key] != getattr(cfg, key):
            raise CheckpointError(f"--resume: the checkpoint {path} was written with {key}={saved[key]!r}, "
                                  f"this run has {getattr(cfg, key)!r}")
    try:
        trainer.model.load_state_dict(state["model"])
        if trainer.ema is not None:
            trainer.ema.load_state_dict(state["ema"])
        trainer.optimizer.load_state_dict(state["optimizer"])
        trainer.scheduler.load_state_dict(state["scheduler"])
    except (RuntimeError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise CheckpointError(f"--resume: the checkpoint {path} does not fit this run: "
                              f"{str(e).strip().splitlines()[0][:300]}") from None
    rngs = state["rng"]
    ckpt.set_rng_state(rngs[rank] if len(rngs) == world else rngs[0])
    return state["step"], state["data_position"], state["skipped"]


def _train(cfg: TrainConfig, info, micro: int, stop: _Stop) -> Dict[str, Any]:
    rank, world, device = info.rank, info.world_size, info.device
    os.makedirs(cfg.output_dir, exist_ok=True)
    path = os.path.join(cfg.output_dir, CHECKPOINT)
    if rank == 0:
        stale = ckpt.remove_stale(path)
        if stale and not cfg.quiet:
            print(f"removed {len(stale)} temporary file(s) of an interrupted checkpoint write", file=sys.stderr)

    # ---- model, EMA, scorer, optimiser (same seed on every rank: identical initial weights)
    trainer = build_step(cfg, device)
    _check_fits(cfg, trainer)
    clip, tokenizer, size, model = trainer.clip, trainer.tokenizer, trainer.size, trainer.model
    ema, scorer, optimizer, scheduler = trainer.ema, trainer.scorer, trainer.optimizer, trainer.scheduler

    # ---- resume; the metrics log restarts at the step the run starts from
    step, data_pos, skipped_total = 0, 0, 0
    written: Optional[int] = None               # the step of the last checkpoint that resumes
    if cfg.resume and os.path.exists(path):
        step, data_pos, skipped_total = _resume(cfg, trainer, path, rank, world)
        written = step
        if not cfg.quiet and rank == 0:
            print(f"resumed from {path} at step {step}", file=sys.stderr)
    elif cfg.resume and not cfg.quiet and rank == 0:
        print(f"--resume: no checkpoint at {path}, starting fresh", file=sys.stderr)
    if rank == 0:
        metrics.truncate(os.path.join(cfg.output_dir, METRICS), step)

    net = model
    if world > 1:
        net = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
    if cfg.compile:
        net = torch.compile(net)

    source_kwargs = dict(image_size=cfg.embedded_size or 2 * size, num_classes=cfg.classes,
                         samples_per_class=cfg.samples_per_class, csv_img_key=cfg.csv_img_key,
                         csv_caption_key=cfg.csv_caption_key)
    loader = make_train_loader(cfg.data, make_transform(cfg.method, size, cfg.ema_crop), tokenizer,
                               micro_batch=micro, rank=rank, world=world, seed=cfg.seed,
                               start=data_pos, workers=cfg.workers, source_kwargs=source_kwargs,
                               pin_memory=device.type == "cuda")
    batches = iter(loader)

    def last_good() -> str:
        if written is None:
            return "no checkpoint was written"
        return f"the last good checkpoint is {path} (step {written}), which --resume continues from"

    def snapshot(reason: str) -> Dict[str, Any]:
        """What a checkpoint of this step holds besides the live model and optimiser (all ranks)."""
        rngs = ckpt.rng_state()
        if world > 1:
            gathered = [None] * world
            torch.distributed.all_gather_object(gathered, rngs)
            rngs = gathered
        else:
            rngs = [rngs]
        return {"step": step, "data_position": data_pos, "skipped": skipped_total, "rng": rngs,
                "config": asdict(cfg), "reason": reason}

    def save(snap: Dict[str, Any]) -> None:
        nonlocal written
        state = {"model": model.state_dict(), "ema": None if ema is None else ema.state_dict(),
                 "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), **snap}
        if not ckpt.all_finite([state["model"], state["ema"], state["optimizer"]]):
            raise NonFiniteLoss(f"non-finite weights or optimiser state at step {snap['step']} ({cfg.method}): "
                                f"not saved; {last_good()}")
        if rank == 0:
            ckpt.save_atomic(state, path)
        barrier()
        written = snap["step"]

    losses: List[float] = []
    step_times: List[float] = []
    status, steps_here = "done", 0
    due: Optional[Dict[str, Any]] = None        # the periodic checkpoint of the previous step

    bar = None
    if cfg.progress and rank == 0:
        from tqdm import tqdm
        bar = tqdm(total=cfg.steps, initial=step, desc=f"{cfg.method}", dynamic_ncols=True,
                   file=sys.stderr, mininterval=1.0)
    stop.defer()
    while step < cfg.steps:
        t0 = time.perf_counter()
        model.train()
        terms: Dict[str, float] = {}
        skipped = 0
        for m in range(cfg.accum):
            batch = _to(next(batches), device)
            data_pos += 1
            skipped += batch.pop("skipped")
            sync = m == cfg.accum - 1 or world == 1
            out = micro_step(trainer, net, batch, cfg.accum, no_sync=not sync and hasattr(net, "no_sync"))
            for k, v in out.items():
                terms[k] = terms.get(k, 0.0) + float(v.detach()) / cfg.accum
        keys = sorted(terms)
        reduced = all_reduce_mean(torch.tensor([terms[k] for k in keys], dtype=torch.float64))
        terms = dict(zip(keys, reduced.tolist()))
        skipped_total += int(all_reduce_sum(torch.tensor(skipped)).item())
        loss = terms["loss"]
        if not math.isfinite(loss):
            if bar is not None:
                bar.close()
            raise NonFiniteLoss(f"non-finite loss {loss} at step {step + 1} ({cfg.method}, terms "
                                f"{ {k: v for k, v in terms.items()} }); stopped before the "
                                f"optimiser step; {last_good()}")
        if due is not None:                 # the weights of the previous step gave a finite loss
            save(due)
            due = None
        lr, momentum = apply_update(trainer, step)
        step += 1
        steps_here += 1
        losses.append(loss)
        dt = time.perf_counter() - t0
        step_times.append(dt)
        if bar is not None:
            post = dict(loss=f"{loss:.3f}", lr=f"{lr:.2e}")
            if skipped_total:
                post["skipped"] = skipped_total
            bar.set_postfix(post, refresh=False)
            bar.update(1)
        if step % cfg.log_every == 0 or step == cfg.steps or step == 1:
            rec = {"step": step, "lr": lr, "step_time": dt, "samples_per_s": cfg.batch_size / dt,
                   "skipped": skipped_total, "logit_scale": float(clip.logit_scale.detach().exp())}
            rec.update(terms)
            if momentum is not None:
                rec["ema_momentum"] = momentum
            _log(cfg, rec, rank)
        # all ranks must agree to stop: reduce the SIGTERM flag
        stopping = bool(all_reduce_sum(torch.tensor(int(stop.flag))).item())
        if stopping or (cfg.stop_after is not None and steps_here >= cfg.stop_after):
            status = "stopped"
            break
        if cfg.ckpt_every and step % cfg.ckpt_every == 0 and step < cfg.steps:
            due = snapshot("periodic")
    if bar is not None:
        bar.close()
    save(snapshot("sigterm" if status == "stopped" and stop.flag else "end" if status == "done" else "stop_after"))
    stop.restore()

    timed = step_times[1:] or step_times
    result = {"status": status, "step": step, "losses": losses, "checkpoint": path,
              "mean_step_time": float(np.mean(timed)) if timed else float("nan"),
              "skipped": skipped_total, "metrics": {}}
    if status == "done" and rank == 0:
        if cfg.evaluate:
            val = cfg.val_data or (cfg.data if cfg.data == "embedded" else None)
            if val is not None:
                evalset = make_eval_set(val, size, cfg.val_limit, dict(
                    source_kwargs, samples_per_class=cfg.val_per_class))
                result["metrics"] = evaluate(clip, tokenizer, evalset, device)
        if cfg.save_masks:
            from .visualize import save_mask_png
            result["mask_png"], result["metrics"]["object_patches_kept"] = save_mask_png(
                os.path.join(cfg.output_dir, "masks.png"), cfg, model, scorer, size, source_kwargs, device)
        _log(cfg, {"final": True, "step": step, "mean_step_time": result["mean_step_time"],
                   "skipped": skipped_total, **result["metrics"]}, rank)
    barrier()
    return result

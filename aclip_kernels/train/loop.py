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

import contextlib
import math
import os
import signal
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Dict, List, Optional

import numpy as np
import torch
from tqdm import tqdm

from . import checkpoint as ckpt
from . import metrics
from .augment import make_transform
from .config import RESUME_KEYS, TrainConfig
from .data import make_eval_set, make_train_loader
from .distributed import DistInfo, all_reduce_mean, all_reduce_sum, barrier, init_distributed
from .errors import CheckpointError, NonFiniteLoss, Stopped, UserError
from .evaluate import evaluate
from .model import METHODS
from .step import StepState, apply_update, build_step, micro_step
from .visualize import save_mask_png

__all__ = ["TrainConfig", "NonFiniteLoss", "train", "CHECKPOINT", "METRICS"]

CHECKPOINT = "checkpoint.pt"
METRICS = "metrics.jsonl"


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


@dataclass
class _Run:
    """One run between steps: what it trains, where it is (step, data position in global
    micro-batches, skipped samples), the step of the last checkpoint that resumes, and this
    process's per-step losses and times."""
    cfg: TrainConfig
    dist: DistInfo
    trainer: StepState
    step: int = 0
    start: int = 0                              # the step this process started from
    data_position: int = 0
    skipped: int = 0
    written: Optional[int] = None
    losses: List[float] = field(default_factory=list)
    step_times: List[float] = field(default_factory=list)

    @property
    def path(self) -> str:
        return os.path.join(self.cfg.output_dir, CHECKPOINT)

    @property
    def chatty(self) -> bool:
        return self.dist.rank == 0 and not self.cfg.quiet

    def source_kwargs(self) -> Dict[str, Any]:
        """The data source options (embedded set, CSV columns) of the run."""
        cfg = self.cfg
        return dict(image_size=cfg.embedded_size or 2 * self.trainer.size, num_classes=cfg.classes,
                    samples_per_class=cfg.samples_per_class, csv_img_key=cfg.csv_img_key,
                    csv_caption_key=cfg.csv_caption_key)


def train(cfg: TrainConfig) -> Dict[str, Any]:
    """Run (or resume) a training run. Returns {"status": "done" | "stopped", "step", "losses"
    (this process's per-step global losses, in step order), "metrics", "mean_step_time",
    "skipped", "checkpoint"}. Raises NonFiniteLoss on a NaN/inf loss, ``UserError`` for a config,
    data source or checkpoint that cannot work, ``Stopped`` on SIGTERM before the first step."""
    if cfg.method not in METHODS:
        raise UserError(f"--method {cfg.method!r} must be one of {METHODS}")
    with _Stop() as stop:                       # before the slow start-up
        dist = init_distributed(cfg.device)
        if cfg.batch_size % (cfg.accum * dist.world_size):
            raise UserError(f"--batch-size {cfg.batch_size} must be divisible by accum ({cfg.accum}) x "
                            f"world size ({dist.world_size})")
        threads_before = torch.get_num_threads()
        if dist.device.type == "cpu":
            # small CPU ops pay a parallel-region barrier per thread: leave a core to the data worker
            cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
            torch.set_num_threads(cfg.threads or max(1, (cores or 1) // dist.world_size - cfg.workers))
        try:
            return _train(cfg, dist, stop)
        finally:
            torch.set_num_threads(threads_before)


def _train(cfg: TrainConfig, dist: DistInfo, stop: _Stop) -> Dict[str, Any]:
    """Start-up, the step loop, the last checkpoint and the evaluation."""
    remove_stale_files(cfg, dist.rank)
    trainer = build_step(cfg, dist.device)      # same seed on every rank: identical initial weights
    check_fits(cfg, trainer)
    run = _Run(cfg, dist, trainer)
    resume(run)
    net = wrap(trainer.model, cfg, dist)
    batches = iter(train_loader(run))
    status, due = "done", None                  # due: the periodic checkpoint of the previous step
    stop.defer()
    with progress_bar(run) as bar:
        while run.step < cfg.steps:
            t0 = time.perf_counter()
            terms = forward_backward(run, net, batches)
            check_finite(run, terms)
            if due is not None:                 # the weights of the previous step gave a finite loss
                save_checkpoint(run, due)
                due = None
            lr, momentum = apply_update(trainer, run.step)
            run.step += 1
            log_step(run, terms, lr, momentum, time.perf_counter() - t0, bar)
            if should_stop(run, stop):
                status = "stopped"
                break
            if cfg.ckpt_every and run.step % cfg.ckpt_every == 0 and run.step < cfg.steps:
                due = snapshot(run, "periodic")
    reason = "end" if status == "done" else "sigterm" if stop.flag else "stop_after"
    save_checkpoint(run, snapshot(run, reason))
    stop.restore()
    return evaluate_and_finish(run, status)


def remove_stale_files(cfg: TrainConfig, rank: int) -> None:
    """Create the output directory and remove what an interrupted checkpoint write left there."""
    os.makedirs(cfg.output_dir, exist_ok=True)
    if rank == 0:
        stale = ckpt.remove_stale(os.path.join(cfg.output_dir, CHECKPOINT))
        if stale and not cfg.quiet:
            print(f"removed {len(stale)} temporary file(s) of an interrupted checkpoint write", file=sys.stderr)


def check_fits(cfg: TrainConfig, trainer: StepState) -> None:
    """The flags that depend on the model's patch grid."""
    grid = getattr(trainer.clip.visual, "grid_size", None)
    if grid is None:
        return
    if min(grid) < 1:
        raise UserError(f"image size {trainer.size} is smaller than a patch of {cfg.model}")
    if trainer.aclip and (grid[0] % cfg.block or grid[1] % cfg.block):
        raise UserError(f"--block {cfg.block} must divide the {grid[0]}x{grid[1]} patch grid of {cfg.model} "
                        f"at {trainer.size} px")


def resume(run: _Run) -> None:
    """With --resume and a checkpoint, load it into the trainer and this rank's RNGs and continue
    from its step; the metrics log is cut back to the step the run starts from."""
    cfg, path = run.cfg, run.path
    if cfg.resume and os.path.exists(path):
        state = ckpt.load(path)
        _check_resumable(cfg, state["config"], path)
        _load_state(run.trainer, state, path)
        rngs = state["rng"]
        ckpt.set_rng_state(rngs[run.dist.rank] if len(rngs) == run.dist.world_size else rngs[0])
        run.step = run.start = run.written = state["step"]
        run.data_position, run.skipped = state["data_position"], state["skipped"]
        if run.chatty:
            print(f"resumed from {path} at step {run.step}", file=sys.stderr)
    elif cfg.resume and run.chatty:
        print(f"--resume: no checkpoint at {path}, starting fresh", file=sys.stderr)
    if run.dist.rank == 0:
        metrics.truncate(os.path.join(cfg.output_dir, METRICS), run.step)


def _check_resumable(cfg: TrainConfig, saved: Dict[str, Any], path: str) -> None:
    for key in RESUME_KEYS:
        if key in saved and saved[key] != getattr(cfg, key):
            raise CheckpointError(f"--resume: the checkpoint {path} was written with {key}={saved[key]!r}, "
                                  f"this run has {getattr(cfg, key)!r}")


def _load_state(trainer: StepState, state: Dict[str, Any], path: str) -> None:
    """The model, EMA, optimiser and schedule of a checkpoint (other entries, such as the
    ``scaler`` of checkpoints written before it was removed, are ignored)."""
    try:
        trainer.model.load_state_dict(state["model"])
        if trainer.ema is not None:
            trainer.ema.load_state_dict(state["ema"])
        trainer.optimizer.load_state_dict(state["optimizer"])
        trainer.scheduler.load_state_dict(state["scheduler"])
    except (RuntimeError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise CheckpointError(f"--resume: the checkpoint {path} does not fit this run: "
                              f"{str(e).strip().splitlines()[0][:300]}") from None


def wrap(model: torch.nn.Module, cfg: TrainConfig, dist: DistInfo) -> torch.nn.Module:
    """The module the steps run: the model, in DDP with several processes, compiled with --compile."""
    net = model
    if dist.world_size > 1:
        net = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[dist.device.index] if dist.device.type == "cuda" else None)
    return torch.compile(net) if cfg.compile else net


def train_loader(run: _Run):
    """This rank's micro-batches from the run's data position on."""
    cfg, dist = run.cfg, run.dist
    return make_train_loader(cfg.data, make_transform(cfg.method, run.trainer.size, cfg.ema_crop),
                             run.trainer.tokenizer, micro_batch=cfg.batch_size // cfg.accum, rank=dist.rank,
                             world=dist.world_size, seed=cfg.seed, start=run.data_position, workers=cfg.workers,
                             source_kwargs=run.source_kwargs(), pin_memory=dist.device.type == "cuda")


def progress_bar(run: _Run):
    """A tqdm bar on rank 0 with --progress (closed on leaving the ``with``), else a context of None."""
    if not (run.cfg.progress and run.dist.rank == 0):
        return contextlib.nullcontext()
    return tqdm(total=run.cfg.steps, initial=run.step, desc=run.cfg.method, dynamic_ncols=True,
                file=sys.stderr, mininterval=1.0)


def forward_backward(run: _Run, net: torch.nn.Module, batches) -> Dict[str, float]:
    """The ``accum`` micro-batches of one step (DDP syncs the gradients on the last); returns the
    loss terms averaged over micro-batches and ranks, and counts the samples the data skipped."""
    cfg, world = run.cfg, run.dist.world_size
    run.trainer.model.train()
    terms: Dict[str, float] = {}
    skipped = 0
    for m in range(cfg.accum):
        batch = _to(next(batches), run.dist.device)
        run.data_position += 1
        skipped += batch.pop("skipped")
        sync = m == cfg.accum - 1 or world == 1
        out = micro_step(run.trainer, net, batch, cfg.accum, no_sync=not sync and hasattr(net, "no_sync"))
        for k, v in out.items():
            terms[k] = terms.get(k, 0.0) + float(v.detach()) / cfg.accum
    keys = sorted(terms)
    reduced = all_reduce_mean(torch.tensor([terms[k] for k in keys], dtype=torch.float64))
    run.skipped += int(all_reduce_sum(torch.tensor(skipped)).item())
    return dict(zip(keys, reduced.tolist()))


def _to(batch: Dict[str, Any], device) -> Dict[str, Any]:
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def check_finite(run: _Run, terms: Dict[str, float]) -> None:
    """Raise ``NonFiniteLoss`` (before the optimiser step) on a NaN/inf loss."""
    loss = terms["loss"]
    if not math.isfinite(loss):
        raise NonFiniteLoss(f"non-finite loss {loss} at step {run.step + 1} ({run.cfg.method}, terms {terms}); "
                            f"stopped before the optimiser step; {last_good(run)}")


def last_good(run: _Run) -> str:
    if run.written is None:
        return "no checkpoint was written"
    return f"the last good checkpoint is {run.path} (step {run.written}), which --resume continues from"


def snapshot(run: _Run, reason: str) -> Dict[str, Any]:
    """What a checkpoint of this step holds besides the live model and optimiser (all ranks take
    part: every rank's RNG states are gathered)."""
    rngs = ckpt.rng_state()
    if run.dist.world_size > 1:
        gathered = [None] * run.dist.world_size
        torch.distributed.all_gather_object(gathered, rngs)
        rngs = gathered
    else:
        rngs = [rngs]
    return {"step": run.step, "data_position": run.data_position, "skipped": run.skipped, "rng": rngs,
            "config": asdict(run.cfg), "reason": reason}


def save_checkpoint(run: _Run, snap: Dict[str, Any]) -> None:
    """Write the checkpoint of ``snap`` (rank 0, atomically), only from finite weights and
    optimiser state: otherwise raise ``NonFiniteLoss`` naming the last good checkpoint."""
    t = run.trainer
    state = {"model": t.model.state_dict(), "ema": None if t.ema is None else t.ema.state_dict(),
             "optimizer": t.optimizer.state_dict(), "scheduler": t.scheduler.state_dict(), **snap}
    if not ckpt.all_finite([state["model"], state["ema"], state["optimizer"]]):
        raise NonFiniteLoss(f"non-finite weights or optimiser state at step {snap['step']} ({run.cfg.method}): "
                            f"not saved; {last_good(run)}")
    if run.dist.rank == 0:
        ckpt.save_atomic(state, run.path)
    barrier()
    run.written = snap["step"]


def log_step(run: _Run, terms: Dict[str, float], lr: float, momentum: Optional[float], dt: float, bar) -> None:
    """Record the step's loss and time, advance the bar, and append a metrics.jsonl record on the
    first, every --log-every-th and the last step."""
    cfg = run.cfg
    run.losses.append(terms["loss"])
    run.step_times.append(dt)
    if bar is not None:
        post = dict(loss=f"{terms['loss']:.3f}", lr=f"{lr:.2e}")
        if run.skipped:
            post["skipped"] = run.skipped
        bar.set_postfix(post, refresh=False)
        bar.update(1)
    if run.step % cfg.log_every == 0 or run.step == cfg.steps or run.step == 1:
        rec = {"step": run.step, "lr": lr, "step_time": dt, "samples_per_s": cfg.batch_size / dt,
               "skipped": run.skipped, "logit_scale": float(run.trainer.clip.logit_scale.detach().exp())}
        rec.update(terms)
        if momentum is not None:
            rec["ema_momentum"] = momentum
        _log(run, rec)


def _log(run: _Run, record: Dict[str, Any]) -> None:
    if run.dist.rank == 0:
        metrics.append(os.path.join(run.cfg.output_dir, METRICS), record)


def should_stop(run: _Run, stop: _Stop) -> bool:
    """SIGTERM on any rank (all ranks must agree: the flag is reduced) or --stop-after reached."""
    stopping = bool(all_reduce_sum(torch.tensor(int(stop.flag))).item())
    return stopping or (run.cfg.stop_after is not None and run.step - run.start >= run.cfg.stop_after)


def evaluate_and_finish(run: _Run, status: str) -> Dict[str, Any]:
    """``train``'s result; a finished run is evaluated (and its masks drawn) on rank 0, which
    appends the final metrics.jsonl record."""
    cfg, t = run.cfg, run.trainer
    timed = run.step_times[1:] or run.step_times
    result = {"status": status, "step": run.step, "losses": run.losses, "checkpoint": run.path,
              "mean_step_time": float(np.mean(timed)) if timed else float("nan"),
              "skipped": run.skipped, "metrics": {}}
    if status == "done" and run.dist.rank == 0:
        val = cfg.val_data or (cfg.data if cfg.data == "embedded" else None)
        if cfg.evaluate and val is not None:
            evalset = make_eval_set(val, t.size, cfg.val_limit, dict(run.source_kwargs(),
                                                                     samples_per_class=cfg.val_per_class))
            result["metrics"] = evaluate(t.clip, t.tokenizer, evalset, run.dist.device)
        if cfg.save_masks:
            result["mask_png"], result["metrics"]["object_patches_kept"] = save_mask_png(
                os.path.join(cfg.output_dir, "masks.png"), cfg, t.model, t.scorer, t.size, run.source_kwargs(),
                run.dist.device)
        _log(run, {"final": True, "step": run.step, "mean_step_time": result["mean_step_time"],
                   "skipped": run.skipped, **result["metrics"]})
    barrier()
    return result

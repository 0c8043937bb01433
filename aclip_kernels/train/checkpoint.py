"""Atomic, safe-to-load checkpoints and RNG state capture.

A checkpoint is one ``torch.save`` dict of tensors and plain containers only: model, EMA,
optimiser, lr scheduler, step, data position (global micro-batches consumed), skipped-sample count,
the config (a dict), and every rank's RNG states (python, numpy, torch CPU, CUDA) as lists and
tensors. ``load`` reads it with ``torch.load(weights_only=True)``: a file holding anything else (a
planted pickle) is refused before any of it runs.

It is written to a temporary file ``.tmp-<name>*`` in the same directory, flushed and fsynced, then
renamed over the target (``os.replace``, atomic on POSIX), so a crash or SIGKILL mid-write leaves
the previous checkpoint intact; ``remove_stale`` deletes what such a crash left behind.
"""
from __future__ import annotations

import glob
import os
import random
import tempfile
import warnings
from typing import Any, Dict

import numpy as np
import torch

from .errors import CheckpointError

__all__ = ["save_atomic", "load", "remove_stale", "all_finite", "rng_state", "set_rng_state", "KEYS"]

KEYS = ("model", "ema", "optimizer", "scheduler", "step", "data_position", "skipped", "rng", "config")


def _temp_prefix(path: str) -> str:
    return ".tmp-" + os.path.basename(path)


def save_atomic(state: Dict[str, Any], path: str) -> None:
    """Write ``state`` to ``path`` via temp file + fsync + rename."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=_temp_prefix(path), dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)                 # mkstemp makes 0600
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def remove_stale(path: str) -> list:
    """Delete the temporary files a killed ``save_atomic(..., path)`` left; returns their paths."""
    directory = os.path.dirname(os.path.abspath(path))
    stale = glob.glob(os.path.join(glob.escape(directory), glob.escape(_temp_prefix(path)) + "*"))
    for f in stale:
        os.unlink(f)
    return stale


_BOILERPLATE = ("Weights only load failed", "Please file an issue", "Check the documentation")


def _reason(e: BaseException) -> str:
    """The first sentence of a torch.load error that says what is wrong (a weights-only refusal
    is a paragraph of advice around one such line)."""
    lines = [s.strip() for s in str(e).splitlines() if s.strip() and not s.strip().startswith(_BOILERPLATE)]
    return lines[0].split(". ")[0][:200] if lines else type(e).__name__


def load(path: str, map_location="cpu") -> Dict[str, Any]:
    """A checkpoint written by ``save_atomic``; raises ``CheckpointError`` (one line) for a file
    that is unreadable, not a checkpoint, holds anything but tensors and plain containers, or
    holds non-finite tensors."""
    try:
        with warnings.catch_warnings():               # about a file refused anyway
            warnings.simplefilter("ignore")
            state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:                            # any failure: the file is unusable
        raise CheckpointError(f"cannot load checkpoint {path}: {_reason(e)}") from None
    missing = [k for k in KEYS if k not in state] if isinstance(state, dict) else list(KEYS)
    if missing:
        raise CheckpointError(f"{path} is not a checkpoint of this trainer: it lacks {missing}")
    if not all_finite(state):
        raise CheckpointError(f"checkpoint {path} holds non-finite tensors")
    return state


def all_finite(tree) -> bool:
    """Whether every floating-point tensor in nested dicts / lists / tuples is finite."""
    if isinstance(tree, torch.Tensor):
        return not tree.is_floating_point() or bool(torch.isfinite(tree).all())
    if isinstance(tree, dict):
        return all(all_finite(v) for v in tree.values())
    if isinstance(tree, (list, tuple)):
        return all(all_finite(v) for v in tree)
    return True


def rng_state() -> Dict[str, Any]:
    """This process's RNG states as lists and tensors (what ``weights_only`` loads)."""
    version, internal, gauss = random.getstate()
    state = {"python": [version, list(internal), gauss], "numpy": np.random.get_state(legacy=False),
             "torch": torch.get_rng_state()}
    state["numpy"]["state"]["key"] = state["numpy"]["state"]["key"].tolist()
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    numpy = dict(state["numpy"], state=dict(state["numpy"]["state"]))
    numpy["state"]["key"] = np.asarray(numpy["state"]["key"], dtype=np.uint32)
    np.random.set_state(numpy)
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])

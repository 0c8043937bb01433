"""Atomic checkpoints and RNG state capture.

A checkpoint is one ``torch.save`` dict: model, EMA, optimiser, grad scaler, lr scheduler, step,
data position (global micro-batches consumed), skipped-sample count, the config, and every rank's
RNG states (python, numpy, torch CPU, CUDA). It is written to a temporary file in the same
directory, flushed and fsynced, then renamed over the target (``os.replace``, atomic on POSIX), so a
crash or SIGKILL mid-write leaves the previous checkpoint intact.
"""
from __future__ import annotations

import os
import random
import tempfile
from typing import Any, Dict

import numpy as np
import torch

__all__ = ["save_atomic", "load", "rng_state", "set_rng_state"]


def save_atomic(state: Dict[str, Any], path: str) -> None:
    """Write ``state`` to ``path`` via temp file + fsync + rename."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-" + os.path.basename(path), dir=directory)
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


def load(path: str, map_location="cpu") -> Dict[str, Any]:
    return torch.load(path, map_location=map_location, weights_only=False)


def rng_state() -> Dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])

"""The trainer's exceptions. ``python -m aclip_kernels.train`` reports a ``UserError`` (bad flags,
data or checkpoint) and a ``NonFiniteLoss`` as one ``error: ...`` line with exit status 2."""
from __future__ import annotations

__all__ = ["UserError", "DataError", "CheckpointError", "NonFiniteLoss", "Stopped"]


class UserError(ValueError):
    """Input the user can fix: the message is the whole report (one line, no traceback)."""

    def __init__(self, message: str):
        # a DataLoader worker's error reaches the main process as "Caught X in DataLoader worker
        # process 0.\nOriginal Traceback ...\npackage.X: message": keep the message
        lines = str(message).strip().splitlines()
        if len(lines) > 1 and lines[0].startswith("Caught "):
            message = lines[-1].split(": ", 1)[-1]
        super().__init__(message)


class DataError(UserError):
    """A data source that is missing, empty or unreadable."""


class CheckpointError(UserError):
    """A checkpoint that cannot be loaded safely or does not fit the run."""


class NonFiniteLoss(RuntimeError):
    """A non-finite loss, or non-finite weights or optimiser state at a checkpoint: the run stops
    before the bad state is saved, and the message names the last checkpoint that resumes."""


class Stopped(Exception):
    """SIGTERM before the first step: nothing new to save."""

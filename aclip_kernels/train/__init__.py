"""The reference training loop: A-CLIP and its baselines (CLIP, FLIP, SLIP, A-CLIP-eff).

Run it as ``python -m aclip_kernels.train --method aclip --data embedded ...`` (see ``__main__``),
or under ``torchrun`` for DDP. Modules: ``embedded`` (the offline dataset), ``data`` (CSV,
WebDataset, batching, data position), ``augment`` (three-crop), ``losses``, ``model``, ``optim``,
``checkpoint``, ``metrics`` (the jsonl log), ``errors``, ``config`` (``TrainConfig`` and its flags),
``step`` (one optimiser step), ``loop`` (``train(TrainConfig)``), ``evaluate``, ``visualize``.

Defects of the published A-CLIP code fixed here: the SimCLR term compared view 1 with itself
(``losses``); the EMA crop's left edge was ``min(left1, height2)``, and its extent was drawn before
its top and left moved, so it could miss the views (``augment``).
"""
from ._requirements import check_requirements

check_requirements()

from .config import TrainConfig  # noqa: E402
from .errors import NonFiniteLoss, Stopped, UserError  # noqa: E402
from .loop import CHECKPOINT, train  # noqa: E402

__all__ = ["TrainConfig", "train", "NonFiniteLoss", "UserError", "Stopped", "CHECKPOINT"]

"""The reference training loop: A-CLIP and its baselines (CLIP, FLIP, SLIP, A-CLIP-eff).

Run it as ``python -m aclip_kernels.train --method aclip --data embedded ...`` (see ``__main__``),
or under ``torchrun`` for DDP. Modules: ``embedded`` (the offline dataset), ``data`` (CSV,
WebDataset, batching, data position), ``augment`` (three-crop), ``losses``, ``model``, ``optim``,
``checkpoint``, ``metrics`` (the jsonl log), ``errors``, ``loop`` (``train(TrainConfig)``),
``evaluate``, ``visualize``.

Two defects of the published A-CLIP code are fixed here: the SimCLR term compared view 1 with
itself (``losses``), and the union box's left edge was ``min(left1, height2)`` (``augment``).
"""
from ._requirements import check_requirements

check_requirements()

from .errors import NonFiniteLoss, Stopped, UserError  # noqa: E402
from .loop import CHECKPOINT, TrainConfig, train  # noqa: E402

__all__ = ["TrainConfig", "train", "NonFiniteLoss", "UserError", "Stopped", "CHECKPOINT"]

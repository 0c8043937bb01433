"""``TrainConfig``: every option of a run, with the help text, value check and choices of its
command-line flag in the field's metadata (``__main__`` builds the parser from them).

A field's flag is ``--`` + its name with ``-`` for ``_``; ``flag`` in the metadata overrides it, and
``flag=False`` means the field has no flag. ``default_text`` replaces the default in the help when
the default is ``None`` (computed at run time). Boolean fields are switches: their flag sets the
opposite of the default.
"""
from __future__ import annotations

import argparse
import math
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence

from .data import check_data
from .errors import UserError
from .model import METHODS, known_model

__all__ = ["TrainConfig", "RESUME_KEYS"]


def _checked(convert: Callable[[str], Any], ok: Callable[[Any], bool], expected: str):
    """A flag's value parser: ``convert(text)``, rejected unless ``ok(value)``."""
    def parse(text: str):
        try:
            value = convert(text)
        except ValueError:
            value = None
        if value is None or not ok(value):
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")
        return value
    return parse


def _data(text: str) -> str:
    try:
        check_data(text)
    except UserError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return text


def _model(text: str) -> str:
    if not known_model(text):
        raise argparse.ArgumentTypeError(f"no model config {text!r} (open_clip's, ACLIP-Tiny or ACLIP-Test)")
    return text


def _output_dir(text: str) -> str:
    existing = os.path.abspath(text)
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise argparse.ArgumentTypeError(f"{existing} is not a directory")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise argparse.ArgumentTypeError(f"{existing} is not writable")
    return text


POSITIVE = _checked(int, lambda v: v >= 1, "an integer >= 1")
NON_NEGATIVE = _checked(int, lambda v: v >= 0, "an integer >= 0")
SEED = _checked(int, lambda v: 0 <= v < 2 ** 32, "an integer in [0, 2**32)")
POSITIVE_REAL = _checked(float, lambda v: 0 < v < math.inf, "a finite number > 0")
NON_NEGATIVE_REAL = _checked(float, lambda v: 0 <= v < math.inf, "a finite number >= 0")
FRACTION = _checked(float, lambda v: 0 < v <= 1, "a fraction in (0, 1]")
MOMENTUM = _checked(float, lambda v: 0 <= v <= 1, "a number in [0, 1]")
BETA = _checked(float, lambda v: 0 <= v < 1, "a number in [0, 1)")


def option(default, help: str, *, type: Optional[Callable[[str], Any]] = None,
           choices: Optional[Sequence[str]] = None, default_text: Optional[str] = None, flag: Any = None):
    """A ``TrainConfig`` field and its flag (see the module docstring)."""
    return field(default=default, metadata=dict(help=help, type=type, choices=choices,
                                                 default_text=default_text, flag=flag))


@dataclass
class TrainConfig:
    """Every option of a run; ``python -m aclip_kernels.train --help`` lists them."""
    method: str = option("aclip", "training method", choices=METHODS)
    model: str = option("ACLIP-Tiny", "open_clip model config (ViT-B-16, ...) or ACLIP-Tiny / ACLIP-Test",
                        type=_model)
    data: str = option("embedded", "'embedded', a CSV/TSV of (filepath, title), or WebDataset .tar shards",
                       type=_data)
    val_data: Optional[str] = option(None, "CSV or shards for evaluation", type=_data,
                                     default_text="the embedded val split when --data is embedded, else none")
    steps: int = option(400, "optimiser steps", type=POSITIVE)
    batch_size: int = option(64, "global batch per optimiser step", type=POSITIVE)
    accum: int = option(1, "gradient-accumulation micro-batches per optimiser step", type=POSITIVE)
    lr: float = option(5e-4, "AdamW peak learning rate", type=POSITIVE_REAL)
    weight_decay: float = option(0.5, "AdamW weight decay (not on biases and norms)", type=NON_NEGATIVE_REAL)
    betas: tuple = option((0.9, 0.98), "AdamW betas", type=BETA)
    warmup: Optional[int] = option(None, "linear warmup steps before the cosine schedule", type=NON_NEGATIVE,
                                   default_text="5% of --steps")
    grad_clip: Optional[float] = option(None, "clip the gradient norm to this", type=POSITIVE_REAL,
                                        default_text="no clipping")
    image_size: Optional[int] = option(None, "image side in pixels", type=POSITIVE,
                                       default_text="the model config's")
    keep: float = option(0.5, "fraction of patches each masked view keeps", type=FRACTION)
    block: int = option(2, "attentive selection unit: block x block patches", type=POSITIVE)
    ema_crop: str = option("zoom", "A-CLIP EMA crop: the published zoom-out (corrected) or the views' tight union",
                           choices=("zoom", "union"))
    ema_momentum: float = option(0.996, "base EMA momentum (cosine schedule to 1)", type=MOMENTUM)
    ema_layers: str = option("all", "EMA layers whose [CLS] attention scores the patches", choices=("all", "last"))
    ssl_dim: int = option(256, "SimCLR / BYOL head output size", type=POSITIVE)
    ssl_hidden: int = option(1024, "SimCLR / BYOL head hidden size", type=POSITIVE)
    seed: int = option(0, "seed of the weights, the data order and the augmentation", type=SEED)
    output_dir: str = option("runs/train", "where the checkpoint, metrics.jsonl and masks.png go", type=_output_dir)
    resume: bool = option(False, "continue from OUTPUT_DIR/checkpoint.pt")
    ckpt_every: int = option(200, "checkpoint every this many steps (0: only at the end)", type=NON_NEGATIVE)
    stop_after: Optional[int] = option(None, "checkpoint and exit after this many steps of this process",
                                       type=POSITIVE, default_text="run to --steps")
    workers: int = option(1, "DataLoader worker processes (map-style data)", type=NON_NEGATIVE)
    threads: int = option(0, "CPU intra-op threads (0: the cores minus --workers, at least 1)", type=NON_NEGATIVE)
    device: str = option("auto", "device (auto: cuda when available)", choices=("auto", "cpu", "cuda"))
    precision: str = option("auto", "auto: bf16 autocast on GPU, fp32 on CPU", choices=("auto", "bf16", "fp32"))
    compile: bool = option(False, "torch.compile the training module")
    classes: int = option(10, "embedded set: number of emoji classes", type=POSITIVE)
    samples_per_class: int = option(200, "embedded train set: images per class", type=POSITIVE)
    val_per_class: int = option(20, "embedded val set: images per class", type=POSITIVE)
    embedded_size: Optional[int] = option(None, "embedded images' side in pixels", type=POSITIVE,
                                          default_text="2x the model's image size")
    csv_img_key: str = option("filepath", "CSV column of the image paths")
    csv_caption_key: str = option("title", "CSV column of the captions")
    val_limit: Optional[int] = option(2000, "evaluate on at most this many samples", type=POSITIVE)
    log_every: int = option(10, "append a metrics.jsonl record every this many steps", type=POSITIVE)
    evaluate: bool = option(True, "skip the evaluation at the end", flag="--no-eval")
    save_masks: bool = option(False, "write OUTPUT_DIR/masks.png (the masks of a few images)")
    progress: bool = option(True, "no progress bar", flag="--no-progress")
    quiet: bool = option(False, "no start-up messages on stderr", flag=False)


# a resumed run must match the checkpoint in these
RESUME_KEYS = ("method", "model", "data", "batch_size", "accum", "seed", "image_size", "ssl_dim", "ssl_hidden")

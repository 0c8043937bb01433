"""``python -m aclip_kernels.train``: the command line of the reference training loop.

    python -m aclip_kernels.train --method aclip --data embedded --output-dir runs/aclip
    torchrun --nproc-per-node 8 -m aclip_kernels.train --method aclip --model ViT-B-16 \\
        --data '/data/yfcc-{00000..01023}.tar' --val-data val.csv --batch-size 4096 --steps 90000

At the end it prints the metrics (zero-shot accuracy beside the chance level), the mean step time
and the wall time. Exit status: 0 done or stopped cleanly (SIGTERM / --stop-after: a checkpoint was
written; SIGTERM before the first step: nothing to write), 2 for a bad flag, data source or
checkpoint, or a non-finite loss (the last good checkpoint is left as it was), each reported as one
``error: ...`` line.
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import time

from .data import check_data
from .errors import NonFiniteLoss, Stopped, UserError
from .loop import TrainConfig, train
from .model import METHODS, known_model


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        self.exit(2, f"error: {message} (see --help)\n")


def _checked(convert, ok, expected: str):
    """An argparse ``type``: ``convert(text)``, rejected unless ``ok(value)``."""
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


def parse_args(argv=None) -> TrainConfig:
    d = TrainConfig()
    p = _Parser(prog="python -m aclip_kernels.train", description=__doc__.split("\n\n")[0],
                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--method", choices=METHODS, default=d.method)
    p.add_argument("--model", type=_model, default=d.model,
                   help="open_clip model config (ViT-B-16, ...) or ACLIP-Tiny / ACLIP-Test")
    p.add_argument("--data", type=_data, default=d.data,
                   help="'embedded', a CSV/TSV of (filepath, title), or WebDataset .tar shards")
    p.add_argument("--val-data", type=_data, default=d.val_data,
                   help="CSV or shards for evaluation (default: embedded val split)")
    p.add_argument("--steps", type=POSITIVE, default=d.steps, help="optimiser steps")
    p.add_argument("--batch-size", type=POSITIVE, default=d.batch_size, help="global batch per optimiser step")
    p.add_argument("--accum", type=POSITIVE, default=d.accum, help="gradient-accumulation micro-batches per step")
    p.add_argument("--lr", type=POSITIVE_REAL, default=d.lr)
    p.add_argument("--weight-decay", type=NON_NEGATIVE_REAL, default=d.weight_decay)
    p.add_argument("--betas", type=BETA, nargs=2, default=d.betas)
    p.add_argument("--warmup", type=NON_NEGATIVE, default=d.warmup, help="warmup steps (default 5%% of --steps)")
    p.add_argument("--grad-clip", type=POSITIVE_REAL, default=d.grad_clip)
    p.add_argument("--image-size", type=POSITIVE, default=d.image_size, help="override the model config's image size")
    p.add_argument("--keep", type=FRACTION, default=d.keep, help="fraction of patches the online views keep")
    p.add_argument("--block", type=POSITIVE, default=d.block, help="attentive selection unit: block x block patches")
    p.add_argument("--ema-crop", choices=("zoom", "union"), default=d.ema_crop,
                   help="A-CLIP EMA crop: the published zoom-out (corrected) or the views' tight union")
    p.add_argument("--ema-momentum", type=MOMENTUM, default=d.ema_momentum, help="base EMA momentum (cosine to 1)")
    p.add_argument("--ema-layers", choices=("all", "last"), default=d.ema_layers)
    p.add_argument("--ssl-dim", type=POSITIVE, default=d.ssl_dim, help="SimCLR / BYOL head output size")
    p.add_argument("--ssl-hidden", type=POSITIVE, default=d.ssl_hidden, help="SimCLR / BYOL head hidden size")
    p.add_argument("--seed", type=SEED, default=d.seed)
    p.add_argument("--output-dir", type=_output_dir, default=d.output_dir)
    p.add_argument("--resume", action="store_true", help="continue from OUTPUT_DIR/checkpoint.pt")
    p.add_argument("--ckpt-every", type=NON_NEGATIVE, default=d.ckpt_every, help="0: only at the end")
    p.add_argument("--stop-after", type=POSITIVE, default=d.stop_after, help="checkpoint and exit after this many steps")
    p.add_argument("--workers", type=NON_NEGATIVE, default=d.workers, help="DataLoader workers (map-style data)")
    p.add_argument("--threads", type=NON_NEGATIVE, default=d.threads, help="CPU intra-op threads (0: cores - workers)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default=d.device)
    p.add_argument("--precision", choices=("auto", "bf16", "fp32"), default=d.precision)
    p.add_argument("--compile", action="store_true", help="torch.compile the training module")
    p.add_argument("--classes", type=POSITIVE, default=d.classes, help="embedded set: number of emoji classes")
    p.add_argument("--samples-per-class", type=POSITIVE, default=d.samples_per_class, help="embedded train set")
    p.add_argument("--val-per-class", type=POSITIVE, default=d.val_per_class, help="embedded val set")
    p.add_argument("--embedded-size", type=POSITIVE, default=d.embedded_size,
                   help="embedded images' size (default 2x model)")
    p.add_argument("--csv-img-key", default=d.csv_img_key)
    p.add_argument("--csv-caption-key", default=d.csv_caption_key)
    p.add_argument("--val-limit", type=POSITIVE, default=d.val_limit)
    p.add_argument("--log-every", type=POSITIVE, default=d.log_every)
    p.add_argument("--no-eval", dest="evaluate", action="store_false")
    p.add_argument("--save-masks", action="store_true", help="write OUTPUT_DIR/masks.png")
    p.add_argument("--no-progress", dest="progress", action="store_false")
    a = vars(p.parse_args(argv))
    if a["batch_size"] % a["accum"]:
        p.error(f"--batch-size {a['batch_size']} must be divisible by --accum {a['accum']}")
    a["betas"] = tuple(a["betas"])
    return TrainConfig(**a)


def summary(cfg: TrainConfig, result: dict, wall: float) -> str:
    m = dict(result["metrics"])
    lines = [f"method {cfg.method}  model {cfg.model}  data {cfg.data}  steps {result['step']}  "
             f"batch {cfg.batch_size}  status {result['status']}"]
    if result["losses"]:
        lines.append(f"loss: first {result['losses'][0]:.4f}  last {result['losses'][-1]:.4f}")
    if "zeroshot_top1" in m:
        lines.append(f"zero-shot top-1: {100 * m.pop('zeroshot_top1'):.1f}%  (chance "
                     f"{100 * m.pop('zeroshot_chance'):.1f}%, {m.pop('zeroshot_classes')} classes)")
    keys = [k for k in m if k.startswith(("i2t", "t2i"))]
    if keys:
        lines.append("retrieval: " + "  ".join(f"{k} {100 * m.pop(k):.1f}%" for k in keys)
                     + f"  ({m.pop('val_samples', '?')} images, {m.pop('val_captions', '?')} captions)")
    if m.get("object_patches_kept") is not None:
        lines.append(f"object patches kept by the mask: {100 * m.pop('object_patches_kept'):.1f}% "
                     f"(keep ratio {100 * cfg.keep:.0f}%)")
    lines.append(f"mean step time: {1000 * result['mean_step_time']:.1f} ms  "
                 f"({cfg.batch_size / result['mean_step_time']:.1f} samples/s)  skipped samples: {result['skipped']}")
    if result.get("mask_png"):
        lines.append(f"masks: {result['mask_png']}")
    lines.append(f"checkpoint: {result['checkpoint']}  metrics: {cfg.output_dir}/metrics.jsonl  "
                 f"wall time: {wall:.0f} s")
    return "\n".join(lines)


def main(argv=None) -> int:
    cfg = parse_args(argv)
    t0 = time.time()
    try:
        result = train(cfg)
    except (UserError, NonFiniteLoss) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except Stopped as e:
        print(f"stopped: {e}", file=sys.stderr)
        return 0
    from .distributed import rank
    if rank() == 0:
        print(summary(cfg, result, time.time() - t0), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

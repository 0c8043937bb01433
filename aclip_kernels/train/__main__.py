"""``python -m aclip_kernels.train``: the command line of the reference training loop.

    python -m aclip_kernels.train --method aclip --data embedded --output-dir runs/aclip
    torchrun --nproc-per-node 8 -m aclip_kernels.train --method aclip --model ViT-B-16 \\
        --data '/data/yfcc-{00000..01023}.tar' --val-data val.csv --batch-size 4096 --steps 90000

At the end it prints the metrics (zero-shot accuracy beside the chance level), the mean step time
and the wall time. Exit status: 0 done or stopped cleanly (SIGTERM / --stop-after: a checkpoint was
written), 2 for a non-finite loss (the last good checkpoint is left as it was).
"""
from __future__ import annotations

import argparse
import sys
import time

from .loop import NonFiniteLoss, TrainConfig, train
from .model import METHODS


def parse_args(argv=None) -> TrainConfig:
    d = TrainConfig()
    p = argparse.ArgumentParser(prog="python -m aclip_kernels.train", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--method", choices=METHODS, default=d.method)
    p.add_argument("--model", default=d.model, help="open_clip model config (ViT-B-16, ...) or ACLIP-Tiny / ACLIP-Test")
    p.add_argument("--data", default=d.data, help="'embedded', a CSV/TSV of (filepath, title), or WebDataset .tar shards")
    p.add_argument("--val-data", default=d.val_data, help="CSV or shards for evaluation (default: embedded val split)")
    p.add_argument("--steps", type=int, default=d.steps, help="optimiser steps")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="global batch per optimiser step")
    p.add_argument("--accum", type=int, default=d.accum, help="gradient-accumulation micro-batches per step")
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--weight-decay", type=float, default=d.weight_decay)
    p.add_argument("--betas", type=float, nargs=2, default=d.betas)
    p.add_argument("--warmup", type=int, default=d.warmup, help="warmup steps (default 5%% of --steps)")
    p.add_argument("--grad-clip", type=float, default=d.grad_clip)
    p.add_argument("--image-size", type=int, default=d.image_size, help="override the model config's image size")
    p.add_argument("--keep", type=float, default=d.keep, help="fraction of patches the online views keep")
    p.add_argument("--block", type=int, default=d.block, help="attentive selection unit: block x block patches")
    p.add_argument("--ema-crop", choices=("zoom", "union"), default=d.ema_crop, help="A-CLIP EMA crop: published zoom-out (fixed) | union")
    p.add_argument("--ema-momentum", type=float, default=d.ema_momentum, help="base EMA momentum (cosine to 1)")
    p.add_argument("--ema-layers", choices=("all", "last"), default=d.ema_layers)
    p.add_argument("--ssl-dim", type=int, default=d.ssl_dim, help="SimCLR / BYOL head output size")
    p.add_argument("--ssl-hidden", type=int, default=d.ssl_hidden, help="SimCLR / BYOL head hidden size")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--output-dir", default=d.output_dir)
    p.add_argument("--resume", action="store_true", help="continue from OUTPUT_DIR/checkpoint.pt")
    p.add_argument("--ckpt-every", type=int, default=d.ckpt_every)
    p.add_argument("--stop-after", type=int, default=d.stop_after, help="checkpoint and exit after this many steps")
    p.add_argument("--workers", type=int, default=d.workers, help="DataLoader workers (map-style data)")
    p.add_argument("--threads", type=int, default=d.threads, help="CPU intra-op threads (0: cores - workers)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default=d.device)
    p.add_argument("--precision", choices=("auto", "bf16", "fp32"), default=d.precision)
    p.add_argument("--compile", action="store_true", help="torch.compile the training module")
    p.add_argument("--classes", type=int, default=d.classes, help="embedded set: number of emoji classes")
    p.add_argument("--samples-per-class", type=int, default=d.samples_per_class, help="embedded train set")
    p.add_argument("--val-per-class", type=int, default=d.val_per_class, help="embedded val set")
    p.add_argument("--embedded-size", type=int, default=d.embedded_size, help="embedded images' size (default 2x model)")
    p.add_argument("--csv-img-key", default=d.csv_img_key)
    p.add_argument("--csv-caption-key", default=d.csv_caption_key)
    p.add_argument("--val-limit", type=int, default=d.val_limit)
    p.add_argument("--log-every", type=int, default=d.log_every)
    p.add_argument("--no-eval", dest="evaluate", action="store_false")
    p.add_argument("--save-masks", action="store_true", help="write OUTPUT_DIR/masks.png")
    p.add_argument("--no-progress", dest="progress", action="store_false")
    a = vars(p.parse_args(argv))
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
    except NonFiniteLoss as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    from .distributed import rank
    if rank() == 0:
        print(summary(cfg, result, time.time() - t0), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

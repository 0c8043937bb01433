"""``python -m aclip_kernels.train``: the command line of the reference training loop.

    python -m aclip_kernels.train --method aclip --data embedded --output-dir runs/aclip
    torchrun --nproc-per-node 8 -m aclip_kernels.train --method aclip --model ViT-B-16 \\
        --data '/data/yfcc-{00000..01023}.tar' --val-data val.csv --batch-size 4096 --steps 90000

At the end it prints the run's results (losses, zero-shot accuracy beside the chance level,
retrieval, the mask's object share, skipped samples: deterministic, the same in every run with the
same flags and software) and, apart from them, a timing block (step time, throughput, wall time:
machine-dependent). Exit status: 0
done or stopped cleanly (SIGTERM / --stop-after: a checkpoint was written; SIGTERM before the first
step: nothing to write), 2 for a bad flag, data source or checkpoint, or a non-finite loss (the last
good checkpoint is left as it was), each reported as one ``error: ...`` line.
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
import time

from .config import TrainConfig
from .distributed import rank
from .errors import NonFiniteLoss, Stopped, UserError
from .loop import train


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        self.exit(2, f"error: {message} (see --help)\n")


def _add_flag(p: argparse.ArgumentParser, f: dataclasses.Field) -> None:
    """The flag of one ``TrainConfig`` field, from its metadata (see ``config``)."""
    meta = f.metadata
    if meta["flag"] is False:
        return
    flag = meta["flag"] or "--" + f.name.replace("_", "-")
    text = meta["help"].replace("%", "%%")
    if f.type in (bool, "bool"):
        p.add_argument(flag, dest=f.name, action="store_false" if f.default else "store_true", help=text)
        return
    shown = meta["default_text"] or (" ".join(map(str, f.default)) if isinstance(f.default, tuple) else f.default)
    p.add_argument(flag, dest=f.name, type=meta["type"], choices=meta["choices"], default=f.default,
                   nargs=len(f.default) if isinstance(f.default, tuple) else None,
                   help=f"{text} (default: {str(shown).replace('%', '%%')})")


def parser() -> argparse.ArgumentParser:
    """The argument parser: one flag per ``TrainConfig`` field that has one."""
    p = _Parser(prog="python -m aclip_kernels.train", description=__doc__.split("\n\n")[0])
    for f in dataclasses.fields(TrainConfig):
        _add_flag(p, f)
    return p


def parse_args(argv=None) -> TrainConfig:
    p = parser()
    a = vars(p.parse_args(argv))
    if a["batch_size"] % a["accum"]:
        p.error(f"--batch-size {a['batch_size']} must be divisible by --accum {a['accum']}")
    a["betas"] = tuple(a["betas"])
    return TrainConfig(**a)


def _results(cfg: TrainConfig, result: dict) -> list:
    """The run's deterministic outcome (the same in every run with the same flags and software)."""
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
    lines.append(f"skipped samples: {result['skipped']}")
    return lines


def summary(cfg: TrainConfig, result: dict, wall: float) -> str:
    """What ``main`` prints at the end: the results, then the timing block, then the files."""
    lines = _results(cfg, result)
    lines += ["timing (machine-dependent):",
              f"  mean step time: {1000 * result['mean_step_time']:.1f} ms  "
              f"({cfg.batch_size / result['mean_step_time']:.1f} samples/s)  wall time: {wall:.0f} s"]
    if result.get("mask_png"):
        lines.append(f"masks: {result['mask_png']}")
    lines.append(f"checkpoint: {result['checkpoint']}  metrics: {cfg.output_dir}/metrics.jsonl")
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
    if rank() == 0:
        print(summary(cfg, result, time.time() - t0), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

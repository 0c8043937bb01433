"""The A-CLIP masking ablation (paper Table "mask / views / ratio") on the embedded dataset.

Five settings, every one trained with the same model, initial weights, optimiser, schedule, number
of optimiser steps, data order and online views (seed s gives identical batches and identical
view-1 pixels in every setting); only the masking, and the number of online views, differ:

    none-1v        no mask,        1 view,  100% of the patches
    random-1v      random mask,    1 view,  50%
    random-2v      random mask,    2 views, 50%
    attentive-1v   attentive mask, 1 view,  50%   (EMA [CLS]-attention scores, box-aligned)
    attentive-2v   attentive mask, 2 views, 50%   (A-CLIP)

All settings use the A-CLIP three-crop views (``augment.ThreeCrop``: two online crops with
photometric augmentation, and the EMA crop containing both); 1-view settings train on view 1 only.
Random and attentive masks select the same units (``--block`` x ``--block`` patch blocks) and keep
the same fraction, so they differ only in which blocks are kept. The attentive settings score the
EMA crop with the EMA image tower (cosine momentum 0.996 -> 1), as the training loop does. By
default the loss is the CLIP loss only (averaged over the views), so that masking is the only
difference; ``--full-losses`` uses A-CLIP's losses (2 views: 0.5 CLIP + 0.5 CLIP + SimCLR + 2 BYOL;
1 view: CLIP + 2 BYOL, SimCLR needing two views).

The machinery is the training loop's (``aclip_kernels.train``): ``step.build_step`` (model, EMA,
scorer, optimiser, schedule), ``step.micro_step`` / ``step.apply_update`` (one optimiser step),
``model.TrainModel.set_variant`` (views / mask / loss), the data classes of ``data``, ``augment``,
``evaluate`` and ``visualize.object_fraction_kept``. The only thing not expressible through the
loop's config is the embedded set's object scale, so the loader is assembled here from the loop's
own pieces (same sampler, same per-sample generators: the loop's data order).

Measured per run: zero-shot top-1 and retrieval recall@1 (image->text and text->image) on the val
split, the wall time, and the fraction of caption-object patches (patch centre inside the pasted
emoji's box) that the mask keeps on ``--measure`` val samples (random: a fresh random mask of the
same kind; attentive: the trained EMA's scores, and the untrained EMA's at step 0). Per setting:
FLOPs of one training step (``torch.utils.flop_counter`` over EMA scoring + forward + backward).

    python benchmarks/ablation.py                         # the committed table (3 seeds)
    python benchmarks/ablation.py --seeds 0 --steps 2 --out /tmp/abl   # smoke run
    python benchmarks/ablation.py --render-only                         # rewrite .md / .png from .json
    python benchmarks/ablation.py --render-only --merge A.json B.json --out C   # pool seeds of two runs

Every run's seed also picks the embedded set's classes (as ``--seed`` does in the training loop), so
seeds differ in difficulty; the table therefore also gives differences paired by seed.
"""
from __future__ import annotations

import argparse
import concurrent.futures as cf
import dataclasses
import datetime
import json
import math
import multiprocessing as mp
import os
import platform
import shlex
import sys
import time
from typing import Dict, List

import numpy as np
import torch

from aclip_kernels.benchmarking import cpu_info, pyplot, save_figure, write_json

SETTINGS = {  # key: (label, views, mask, paper IN-1K zero-shot, ViT-B/16 YFCC-15M)
    "none-1v": ("no mask, 1 view, 100%", 1, "none", 37.6),
    "random-1v": ("random mask, 1 view, 50%", 1, "random", 35.0),
    "random-2v": ("random mask, 2 views, 50%", 2, "random", 38.0),
    "attentive-1v": ("attentive mask, 1 view, 50%", 1, "attentive", 39.5),
    "attentive-2v": ("attentive mask, 2 views, 50%", 2, "attentive", 41.3),
}
COST_ORDER = ("attentive-2v", "random-2v", "none-1v", "attentive-1v", "random-1v")   # longest first


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default="ACLIP-Tiny")
    p.add_argument("--steps", type=int, default=250, help="optimiser steps of every run")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    p.add_argument("--keep", type=float, default=0.5, help="fraction kept by the masked settings")
    p.add_argument("--block", type=int, default=2, help="selection unit (block x block patches), both masks")
    p.add_argument("--object-scale", type=float, nargs=2, default=[0.2, 0.35],
                   help="emoji side as a fraction of the embedded image side (dataset default 0.35 0.6)")
    p.add_argument("--classes", type=int, default=10)
    p.add_argument("--samples-per-class", type=int, default=200)
    p.add_argument("--val-per-class", type=int, default=100)
    p.add_argument("--measure", type=int, default=256, help="val samples for the object-patch fractions")
    p.add_argument("--full-losses", action="store_true", help="A-CLIP's full losses instead of CLIP only")
    p.add_argument("--jobs", type=int, default=2, help="runs in parallel (processes)")
    p.add_argument("--threads", type=int, default=1, help="intra-op threads per run")
    p.add_argument("--workdir", default="runs/ablation", help="scratch (checkpoints are not written)")
    p.add_argument("--out", default="benchmarks/results/ablation_cpu",
                   help="output prefix: writes OUT.json, OUT.md, OUT.png")
    p.add_argument("--no-plot", dest="plot", action="store_false")
    p.add_argument("--render-only", action="store_true",
                   help="rewrite OUT.md / OUT.png from OUT.json (adding the object-scale check if missing)")
    p.add_argument("--merge", nargs="+", metavar="JSON",
                   help="with --render-only: pool the runs of these result files (same settings, other seeds) into OUT")
    return p.parse_args(argv)


# ------------------------------------------------------------------------------------------------
# one run


def _config(a: dict, seed: int):
    from aclip_kernels.train import TrainConfig
    return TrainConfig(method="aclip", model=a["model"], steps=a["steps"], batch_size=a["batch_size"],
                       keep=a["keep"], block=a["block"], seed=seed, threads=a["threads"], workers=0,
                       classes=a["classes"], samples_per_class=a["samples_per_class"],
                       val_per_class=a["val_per_class"], device="cpu", precision="fp32",
                       progress=False, quiet=True, ckpt_every=0, evaluate=False,
                       output_dir=os.path.join(a["workdir"], f"s{seed}"))


def _state(a: dict, key: str, seed: int):
    """The loop's step state for one setting, with the setting's views / mask / loss."""
    from aclip_kernels.train.step import build_step
    _, views, mask, _ = SETTINGS[key]
    cfg = _config(a, seed)
    if mask == "none":
        cfg = dataclasses.replace(cfg, keep=1.0)
    state = build_step(cfg, "cpu")
    state.model.set_variant(views, mask, "full" if a["full_losses"] else "clip")
    if not state.model.needs_ema():        # no scores and no BYOL targets: skip the EMA's work
        state = dataclasses.replace(state, aclip=False)
    return state


def _dataset(a: dict, split: str, seed: int, size: int):
    from aclip_kernels.train.embedded import EmbeddedDataset
    per_class = a["samples_per_class"] if split == "train" else a["val_per_class"]
    return EmbeddedDataset(split, 2 * size, a["classes"], per_class,
                           object_scale=tuple(a["object_scale"]), seed=seed)


def _loader(a: dict, state, seed: int):
    """make_train_loader's map-style loader, from the same pieces, over a dataset of our scale."""
    from torch.utils.data import DataLoader
    from aclip_kernels.train.augment import make_transform
    from aclip_kernels.train.data import EmbeddedSource, MicroBatchSampler, TrainSet, collate
    source = EmbeddedSource(_dataset(a, "train", seed, state.size))
    sampler = MicroBatchSampler(len(source), a["batch_size"], 0, 1, seed, 0)
    return DataLoader(TrainSet(source, make_transform("aclip", state.size), state.tokenizer, seed),
                      batch_sampler=sampler, collate_fn=collate, num_workers=0, generator=torch.Generator())


@torch.no_grad()
def object_fractions(a: dict, state, seed: int, views: int, mask: str, scorer=None) -> Dict[str, float]:
    """Mean fraction of caption-object patches kept over ``a["measure"]`` val samples (both online
    views of the three-crop transform for 2 views, view 1 for 1 view): "random" (random mask,
    same keep and block) and, with ``scorer``, "attentive" (its box-aligned scores)."""
    import aclip_kernels as ak
    from aclip_kernels.train.augment import ThreeCrop, to_tensor
    from aclip_kernels.train.data import sample_seed
    from aclip_kernels.train.visualize import object_fraction_kept
    ds = _dataset(a, "val", seed, state.size)
    n = min(a["measure"], len(ds))
    patch = state.clip.visual.patch_size
    grid = (state.size // (patch[0] if isinstance(patch, (tuple, list)) else patch),) * 2
    t = ThreeCrop(state.size)
    samples = [t(to_tensor(ds.image(i)), torch.Generator().manual_seed(sample_seed(seed, 99, i))) for i in range(n)]
    boxes = torch.cat([torch.stack([s["boxes"][v] for s in samples]) for v in range(views)])
    tokens = torch.zeros(views * n, 1 + grid[0] * grid[1], 1)
    idx = {"random": ak.random_mask(tokens, a["keep"], grid=grid, block=a["block"],
                                    generator=torch.Generator().manual_seed(seed))[1]}
    if scorer is not None:
        scores = scorer(torch.stack([s["ema"] for s in samples])).float()
        hs, ws = scorer.grid
        idx["attentive"] = ak.attentive_mask(tokens, scores.view(n, hs, ws), a["keep"], grid=grid,
                                             block=a["block"], boxes=boxes)[1]
    out = {}
    for kind, ix in idx.items():
        fr = [f for v in range(views) for i in range(n)
              if (f := object_fraction_kept(ix[v * n + i], samples[i]["crops"][v].tolist(), ds.object_box(i),
                                            ds.image_size, grid)) is not None]
        out[kind] = float(np.mean(fr)) if fr else float("nan")
    return out


def run_one(a: dict, key: str, seed: int) -> dict:
    """Train one (setting, seed); returns its metrics, wall time and object-patch fractions."""
    torch.set_num_threads(a["threads"])
    from aclip_kernels.train.augment import EvalTransform  # noqa: F401  (import cost outside timing)
    from aclip_kernels.train.data import EmbeddedSource, EvalSet
    from aclip_kernels.train.evaluate import evaluate
    from aclip_kernels.train.step import apply_update, micro_step
    _, views, mask, _ = SETTINGS[key]
    t_start = time.time()
    state = _state(a, key, seed)
    init_fraction = None
    if mask == "attentive" and a["measure"]:
        rng = torch.get_rng_state()        # the measurement must not move the run's random stream
        init_fraction = object_fractions(a, state, seed, views, mask, state.scorer)["attentive"]
        torch.set_rng_state(rng)
    batches = iter(_loader(a, state, seed))
    losses, step_times = [], []
    t_train = time.time()
    for step in range(a["steps"]):
        t0 = time.perf_counter()
        batch = next(batches)
        batch.pop("skipped")
        out = micro_step(state, state.model, batch)
        loss = float(out["loss"].detach())
        if not math.isfinite(loss):
            raise FloatingPointError(f"{key} seed {seed}: non-finite loss {loss} at step {step + 1}")
        apply_update(state, step)
        losses.append(loss)
        step_times.append(time.perf_counter() - t0)
    train_wall = time.time() - t_train
    t_eval = time.time()
    evalset = EvalSet(EmbeddedSource(_dataset(a, "val", seed, state.size)), state.size)
    metrics = evaluate(state.clip, state.tokenizer, evalset, "cpu")
    eval_wall = time.time() - t_eval
    fractions = {"none": 1.0}
    if mask != "none" and a["measure"]:
        fr = object_fractions(a, state, seed, views, mask, state.scorer if mask == "attentive" else None)
        fractions = {mask: fr[mask], "random_same_views": fr["random"]}
    timed = step_times[1:] or step_times
    return {"setting": key, "seed": seed, "zeroshot_top1": metrics.get("zeroshot_top1"),
            "i2t_r@1": metrics["i2t_r@1"], "t2i_r@1": metrics["t2i_r@1"], "i2t_r@5": metrics["i2t_r@5"],
            "t2i_r@5": metrics["t2i_r@5"], "val_samples": metrics["val_samples"],
            "object_patches_kept": fractions.get(mask, 1.0), "object_patches_kept_random_same_views":
            fractions.get("random_same_views"), "object_patches_kept_attentive_at_init": init_fraction,
            "loss_first": losses[0], "loss_last": float(np.mean(losses[-10:])),
            "mean_step_time_s": float(np.mean(timed)), "train_wall_s": train_wall, "eval_wall_s": eval_wall,
            "run_wall_s": time.time() - t_start, "pid": os.getpid()}


def step_flops(a: dict, key: str) -> dict:
    """FLOPs of one optimiser step of a setting (EMA scoring + online forward + backward; AdamW and
    the EMA update are elementwise and not counted), with torch.utils.flop_counter."""
    from torch.utils.flop_counter import FlopCounterMode
    from aclip_kernels.train.step import micro_step
    torch.set_num_threads(a["threads"])
    state = _state(a, key, 0)
    batch = next(iter(_loader(a, state, 0)))
    batch.pop("skipped")
    ema = 0
    if state.aclip:
        with FlopCounterMode(display=False) as fc, torch.no_grad():
            feats, _ = state.scorer.forward_with_output(batch["ema"])
            state.ema.projector(feats)
        ema = fc.get_total_flops()
    with FlopCounterMode(display=False) as fc:
        micro_step(state, state.model, batch)
    return {"step_flops": int(fc.get_total_flops()), "ema_scoring_flops": int(ema)}


@torch.no_grad()
def object_scale_check(a: dict, scales=((0.35, 0.6), None), n: int = 256, draws: int = 4) -> List[dict]:
    """Why the object scale: per scale (None: ``--object-scale``; (0.35, 0.6) is the dataset's
    default), on view 1 of ``n`` val samples: the mean number of object patches per view, and how
    often a random mask (same keep and block) keeps none / at most a quarter of them. No model."""
    import aclip_kernels as ak
    from aclip_kernels.train.augment import ThreeCrop, to_tensor
    from aclip_kernels.train.data import sample_seed
    from aclip_kernels.train.embedded import EmbeddedDataset
    from aclip_kernels.train.model import build_clip, image_size_of
    from aclip_kernels.train.visualize import object_fraction_kept
    clip, _ = build_clip(a["model"])
    size = image_size_of(clip)
    patch = clip.visual.patch_size
    grid = (size // (patch[0] if isinstance(patch, (tuple, list)) else patch),) * 2
    out = []
    for scale in scales:
        scale = tuple(a["object_scale"]) if scale is None else tuple(scale)
        ds = EmbeddedDataset("val", 2 * size, a["classes"], a["val_per_class"], object_scale=scale, seed=0)
        m = min(n, len(ds))
        t = ThreeCrop(size)
        crops = [t(to_tensor(ds.image(i)), torch.Generator().manual_seed(sample_seed(0, 99, i)))["crops"][0].tolist()
                 for i in range(m)]
        inside, fr = [], []
        for i, c in enumerate(crops):
            top, left, h, w = c
            oy, ox, oh, ow = [v * ds.image_size for v in ds.object_box(i)]
            r = (np.arange(grid[0]) + 0.5) / grid[0] * h + top
            cc = (np.arange(grid[1]) + 0.5) / grid[1] * w + left
            inside.append(int(((r[:, None] >= oy) & (r[:, None] < oy + oh) & (cc[None] >= ox) & (cc[None] < ox + ow)).sum()))
        tokens = torch.zeros(m, 1 + grid[0] * grid[1], 1)
        for d in range(draws):
            idx = ak.random_mask(tokens, a["keep"], grid=grid, block=a["block"],
                                 generator=torch.Generator().manual_seed(d))[1]
            fr += [f for i, c in enumerate(crops)
                   if (f := object_fraction_kept(idx[i], c, ds.object_box(i), ds.image_size, grid)) is not None]
        fr = np.array(fr)
        out.append({"object_scale": list(scale), "object_patches_per_view": float(np.mean(inside)),
                    "patches_per_view": grid[0] * grid[1], "views_without_object_patch": float(np.mean(np.array(inside) == 0)),
                    "random_mask_keeps_none": float(np.mean(fr == 0)), "random_mask_keeps_at_most_quarter":
                    float(np.mean(fr <= 0.25)), "random_mask_mean_kept": float(np.mean(fr))})
    return out


# ------------------------------------------------------------------------------------------------
# aggregation and output


def _ms(values: List[float]):
    v = [x for x in values if x is not None and not (isinstance(x, float) and math.isnan(x))]
    if not v:
        return None, None
    return float(np.mean(v)), float(np.std(v, ddof=1)) if len(v) > 1 else 0.0


MERGE_KEYS = ("model", "steps", "batch_size", "settings", "keep", "block", "object_scale", "classes",
              "samples_per_class", "val_per_class", "measure", "full_losses", "threads")


def machine() -> dict:
    cpu, cores = cpu_info()
    return {"cpu": cpu, "cores": cores, "platform": platform.platform(), "python": platform.python_version(),
            "torch": torch.__version__, "device": "cpu", "dtype": "float32"}


def aggregate(a: dict, runs: List[dict], flops: Dict[str, dict]) -> Dict[str, dict]:
    out = {}
    for key in a["settings"]:
        rs = [r for r in runs if r["setting"] == key]
        label, views, mask, paper = SETTINGS[key]
        agg = {"label": label, "views": views, "mask": mask, "keep": 1.0 if mask == "none" else a["keep"],
               "paper_in1k_zeroshot": paper, "seeds": sorted(r["seed"] for r in rs)}
        for m in ("zeroshot_top1", "i2t_r@1", "t2i_r@1", "i2t_r@5", "t2i_r@5", "object_patches_kept",
                  "object_patches_kept_random_same_views", "object_patches_kept_attentive_at_init",
                  "mean_step_time_s", "train_wall_s", "run_wall_s", "loss_last"):
            mean, std = _ms([r.get(m) for r in rs])
            agg[m] = {"mean": mean, "std": std}
        agg.update(flops.get(key, {}))
        # paired with the no-mask run of the same seed (same dataset classes, init, data order)
        base = {r["seed"]: r for r in runs if r["setting"] == "none-1v"}
        for m in ("zeroshot_top1", "i2t_r@1", "t2i_r@1"):
            mean, std = _ms([r[m] - base[r["seed"]][m] for r in rs if r["seed"] in base])
            agg[f"{m}_minus_no_mask"] = {"mean": mean, "std": std}
        out[key] = agg
    ref = flops.get("none-1v", {}).get("step_flops")
    for key, agg in out.items():
        if ref and agg.get("step_flops"):
            agg["step_flops_rel_no_mask"] = agg["step_flops"] / ref
    return out


def _pct(d, digits=1):
    if d is None or d.get("mean") is None:
        return "-"
    return f"{100 * d['mean']:.{digits}f} ± {100 * d['std']:.{digits}f}"


def markdown(result: dict) -> str:
    a, meta = result["args"], result["meta"]
    lines = [f"# A-CLIP masking ablation on the embedded dataset (CPU){' — PARTIAL' if result['partial'] else ''}",
             "",
             f"{meta['date']} · {meta['machine']['cpu']} ({meta['machine']['cores']} cores, shared) · "
             f"torch {meta['machine']['torch']} · fp32",
             "",
             f"Command: `{meta['command']}`",
             ""]
    for m in meta.get("merged", []):
        lines += [f"Pooled with the runs of `{m['command']}` ({m['date']}, "
                  f"{(m.get('wall_s') or 0) / 60:.0f} min wall).", ""]
    lines += [
             f"Model {a['model']}, {a['steps']} AdamW steps of batch {a['batch_size']} per run, "
             f"seeds {a['seeds']}, {a['classes']} classes x {a['samples_per_class']} train images, "
             f"val {a['classes']} x {a['val_per_class']}, object scale {a['object_scale']} of the image side, "
             f"masks keep {a['keep']:.0%} in {a['block']}x{a['block']} blocks, "
             f"loss: {'A-CLIP full losses' if a['full_losses'] else 'CLIP only'}. "
             "Mean ± std over seeds (sample std). Same init, data order and online views in every setting.",
             "",
             "| setting | zero-shot top-1 (%) | i2t R@1 (%) | t2i R@1 (%) | object patches kept (%) "
             "| step time (ms) | run wall (s) | GFLOP / step | FLOPs vs no mask | paper IN-1K |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for key, s in result["settings"].items():
        gf = f"{s['step_flops'] / 1e9:.2f}" if s.get("step_flops") else "-"
        rel = f"{s['step_flops_rel_no_mask']:.2f}x" if s.get("step_flops_rel_no_mask") else "-"
        st = s["mean_step_time_s"]
        step = f"{1000 * st['mean']:.0f} ± {1000 * st['std']:.0f}" if st["mean"] is not None else "-"
        wall = f"{s['run_wall_s']['mean']:.0f}" if s["run_wall_s"]["mean"] is not None else "-"
        lines.append(f"| {s['label']} (n={len(s['seeds'])}) | {_pct(s['zeroshot_top1'])} | {_pct(s['i2t_r@1'])} | "
                     f"{_pct(s['t2i_r@1'])} | {_pct(s['object_patches_kept'])} | {step} | {wall} | {gf} | {rel} "
                     f"| {s['paper_in1k_zeroshot']} |")
    lines += ["", "Paired with the no-mask run of the same seed (the seed also picks the embedded set's classes, "
              "as in the training loop, so seeds differ in difficulty; the paired difference removes that):", "",
              "| setting | Δ zero-shot top-1 (pts) | Δ i2t R@1 (pts) | Δ t2i R@1 (pts) |", "|---|---|---|---|"]
    for key, s in result["settings"].items():
        if key != "none-1v" and s.get("zeroshot_top1_minus_no_mask", {}).get("mean") is not None:
            d = [s[f"{m}_minus_no_mask"] for m in ("zeroshot_top1", "i2t_r@1", "t2i_r@1")]
            lines.append(f"| {s['label']} | " + " | ".join(f"{100 * x['mean']:+.1f} ± {100 * x['std']:.1f}" for x in d) + " |")
    by = {(r["setting"], r["seed"]): r for r in result["runs"]}
    for v in ("1v", "2v"):
        pairs = [(by[("attentive-" + v, sd)], by[("random-" + v, sd)]) for sd in a["seeds"]
                 if ("attentive-" + v, sd) in by and ("random-" + v, sd) in by]
        if pairs:
            d = [_ms([x[m] - y[m] for x, y in pairs]) for m in ("zeroshot_top1", "i2t_r@1", "t2i_r@1")]
            lines.append(f"| attentive minus random, {v[0]} view{'s' if v == '2v' else ''} | "
                         + " | ".join(f"{100 * mu:+.1f} ± {100 * sd:.1f}" for mu, sd in d) + " |")
    if meta.get("wall_s"):
        own = len(result["runs"]) - sum(m.get("runs", 0) for m in meta.get("merged", []))
        lines += ["", f"{'First command' if meta.get('merged') else 'Whole table'}: {meta['wall_s'] / 60:.0f} min wall "
                  f"(FLOP counts + {own} runs, "
                  f"{a['jobs']} at a time); load average {tuple(round(x, 1) for x in meta.get('load_average_start') or ())} "
                  f"at the start, {tuple(round(x, 1) for x in meta.get('load_average_end') or ())} at the end "
                  "(the machine was shared with another engineer's benchmarks)."]
    chance = 100.0 / a["classes"]
    lines += ["", f"Chance: zero-shot and i2t R@1 {chance:.0f}% ({a['classes']} class names); t2i R@1 counts a hit "
              "when the top image has the caption's class (the val captions are the class names: t2i has "
              f"{a['classes']} distinct queries, so it moves in steps of {chance:.0f} points). The paper column is "
              "ImageNet-1K zero-shot of ViT-B/16 trained on YFCC-15M: only the ordering is comparable.", ""]
    att = [s for s in result["settings"].values() if s["mask"] == "attentive"]
    if att:
        lines += ["Object-patch fractions (the paper's mechanism), val samples, patch centre inside the emoji box:", ""]
        for s in att:
            lines.append(f"- {s['label']}: attentive (trained EMA) {_pct(s['object_patches_kept'])}, "
                         f"attentive (EMA at init) {_pct(s['object_patches_kept_attentive_at_init'])}, "
                         f"random on the same views {_pct(s['object_patches_kept_random_same_views'])}")
        lines.append("")
    for c in result.get("object_scale_check", []):
        lines.append(f"- object scale {c['object_scale']}{' (dataset default)' if c['object_scale'] == [0.35, 0.6] else ' (used)'}: "
                     f"{c['object_patches_per_view']:.1f} of {c['patches_per_view']} patches per view are object; "
                     f"a random {a['keep']:.0%} mask in {a['block']}x{a['block']} blocks keeps none of them in "
                     f"{100 * c['random_mask_keeps_none']:.0f}% of views and at most a quarter in "
                     f"{100 * c['random_mask_keeps_at_most_quarter']:.0f}%")
    if result.get("object_scale_check"):
        lines += ["", "The object scale is smaller than the dataset default so that which patches are kept matters: "
                  "at the default scale the emoji covers about a third of a view and a random half-mask almost "
                  "always leaves much of it visible.", ""]
    lines += ["Step time and wall time: 1 intra-op thread per run, "
              f"{a['jobs']} runs in parallel on a machine shared with other jobs; data loading "
              "(three-crop augmentation, also for 1-view settings) is inside the step time. FLOPs: one step, "
              "EMA scoring + forward + backward (torch.utils.flop_counter; optimiser and EMA update not counted)."]
    if result["partial"]:
        lines += ["", f"PARTIAL: {len(result['runs'])} of {len(a['settings']) * len(a['seeds'])} runs finished."]
    return "\n".join(lines) + "\n"


def plot(result: dict, path: str) -> None:
    plt = pyplot()
    keys = list(result["settings"])
    labels = [result["settings"][k]["label"].replace(", ", "\n", 1) for k in keys]
    panels = [("zero-shot top-1 (%)", "zeroshot_top1"), ("i2t R@1 (%)", "i2t_r@1"), ("t2i R@1 (%)", "t2i_r@1"),
              ("object patches kept (%)", "object_patches_kept")]
    fig, grid = plt.subplots(2, 3, figsize=(13, 8.4))
    axes = list(grid.flat[:len(panels)]) + [grid.flat[len(panels)]]
    for ax in grid.flat[len(panels) + 1:]:
        ax.axis("off")
    colours = {"none": "0.6", "random": "tab:orange", "attentive": "tab:blue"}
    for ax, (title, m) in zip(axes, panels):
        x = np.arange(len(keys))
        means = [100 * (result["settings"][k][m]["mean"] or 0) for k in keys]
        stds = [100 * (result["settings"][k][m]["std"] or 0) for k in keys]
        ax.bar(x, means, yerr=stds, capsize=4, color=[colours[result["settings"][k]["mask"]] for k in keys],
               alpha=0.8, hatch=None)
        for i, k in enumerate(keys):
            pts = [100 * r[m] for r in result["runs"] if r["setting"] == k and r.get(m) is not None]
            ax.scatter([i] * len(pts), pts, color="k", s=10, zorder=3)
        if m != "object_patches_kept":
            ax.axhline(100 / result["args"]["classes"], color="r", lw=0.8, ls="--", label="chance")
        else:
            ax.axhline(100 * result["args"]["keep"], color="r", lw=0.8, ls="--", label="keep ratio")
        ax.legend(fontsize=7)
        ax.set_xticks(x)
        ax.set_xticklabels(labels, fontsize=6.5, rotation=30, ha="right")
        ax.set_title(title, fontsize=9)
    ax = axes[-1]                                            # paired difference to no mask
    base = {r["seed"]: r["zeroshot_top1"] for r in result["runs"] if r["setting"] == "none-1v"}
    x = np.arange(len(keys))
    d = [result["settings"][k].get("zeroshot_top1_minus_no_mask", {}) for k in keys]
    ax.bar(x, [100 * (v.get("mean") or 0) for v in d], yerr=[100 * (v.get("std") or 0) for v in d], capsize=4,
           color=[colours[result["settings"][k]["mask"]] for k in keys], alpha=0.8)
    for i, k in enumerate(keys):
        pts = [100 * (r["zeroshot_top1"] - base[r["seed"]]) for r in result["runs"]
               if r["setting"] == k and r["seed"] in base]
        ax.scatter([i] * len(pts), pts, color="k", s=10, zorder=3)
    ax.axhline(0, color="k", lw=0.8)
    ax.set_xticks(x)
    ax.set_xticklabels(labels, fontsize=6.5, rotation=30, ha="right")
    ax.set_title("zero-shot minus no mask, same seed (pts)", fontsize=9)
    a = result["args"]
    save_figure(fig, path, f"A-CLIP masking ablation, embedded set, {a['model']}, {a['steps']} steps x "
                f"{a['batch_size']}, seeds {a['seeds']} (mean ± std, dots: seeds) — "
                f"{result.get('meta', {}).get('machine', {}).get('cpu', 'CPU')}"
                f"{' — PARTIAL' if result['partial'] else ''}")


def write(result: dict, out: str, with_plot: bool) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    write_json(out + ".json", result)
    with open(out + ".md", "w") as f:
        f.write(markdown(result))
    if with_plot and result["runs"]:
        plot(result, out + ".png")


def main(argv=None) -> int:
    args = parse_args(argv)
    a = vars(args)
    if a["render_only"]:
        with open(a["merge"][0] if a["merge"] else a["out"] + ".json") as f:
            result = json.load(f)
        for path in (a["merge"] or [])[1:]:
            with open(path) as f:
                other = json.load(f)
            differ = [k for k in MERGE_KEYS if other["args"][k] != result["args"][k]]
            if differ:
                raise SystemExit(f"--merge: {path} differs in {differ}")
            seen = {(r["setting"], r["seed"]) for r in result["runs"]}
            added = [r for r in other["runs"] if (r["setting"], r["seed"]) not in seen]
            result["runs"] += added
            result["args"]["seeds"] = sorted(set(result["args"]["seeds"]) | set(other["args"]["seeds"]))
            result["partial"] = result["partial"] or other["partial"]
            result["meta"].setdefault("merged", []).append(
                {"from": path, "date": other["meta"]["date"], "command": other["meta"]["command"],
                 "wall_s": other["meta"].get("wall_s"), "runs": len(added)})
        if "object_scale_check" not in result:
            result["object_scale_check"] = object_scale_check(result["args"])
        flops = {k: {f: v[f] for f in ("step_flops", "ema_scoring_flops") if f in v}
                 for k, v in result["settings"].items()}
        result["settings"] = aggregate(result["args"], result["runs"], flops)
        result["meta"]["rendered"] = {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
                                      "command": "python benchmarks/ablation.py" + "".join(
                                          " " + shlex.quote(x) for x in (sys.argv[1:] if argv is None else argv))}
        write(result, a["out"], a["plot"] and not result["partial"])
        print(markdown(result))
        return 0
    cmd = "python benchmarks/ablation.py" + ("".join(" " + shlex.quote(x) for x in (sys.argv[1:] if argv is None else argv)))
    meta = {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "machine": machine(), "command": cmd,
            "load_average_start": os.getloadavg() if hasattr(os, "getloadavg") else None}
    t0 = time.time()
    scale_check = object_scale_check(a, n=min(256, a["measure"]) or 16)
    flops = {}
    for key in a["settings"]:
        flops[key] = step_flops(a, key)
    torch.set_num_threads(a["threads"])
    jobs = [(key, seed) for seed in a["seeds"] for key in COST_ORDER if key in a["settings"]]
    jobs.sort(key=lambda j: COST_ORDER.index(j[0]))          # longest first, seeds interleaved
    runs: List[dict] = []

    def snapshot(partial: bool):
        result = {"meta": dict(meta, wall_s=time.time() - t0,
                               load_average_end=os.getloadavg() if hasattr(os, "getloadavg") else None),
                  "args": a, "partial": partial, "object_scale_check": scale_check,
                  "settings": aggregate(a, runs, flops),
                  "runs": sorted(runs, key=lambda r: (list(SETTINGS).index(r["setting"]), r["seed"]))}
        write(result, a["out"], a["plot"] and not partial)
        return result

    if a["jobs"] <= 1:
        for key, seed in jobs:
            runs.append(run_one(a, key, seed))
            print(f"done {key} seed {seed}: {runs[-1]['zeroshot_top1']:.3f} ({runs[-1]['run_wall_s']:.0f} s)",
                  file=sys.stderr, flush=True)
            snapshot(True)
    else:
        with cf.ProcessPoolExecutor(a["jobs"], mp_context=mp.get_context("spawn")) as pool:
            futures = {pool.submit(run_one, a, key, seed): (key, seed) for key, seed in jobs}
            for fut in cf.as_completed(futures):
                r = fut.result()
                runs.append(r)
                print(f"done {r['setting']} seed {r['seed']}: zero-shot {r['zeroshot_top1']:.3f} "
                      f"objects kept {r['object_patches_kept']:.3f} ({r['run_wall_s']:.0f} s, "
                      f"{time.time() - t0:.0f} s total)", file=sys.stderr, flush=True)
                snapshot(True)
    result = snapshot(False)
    print(markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())

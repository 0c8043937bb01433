"""Step-level cost of every method of the training loop (clip, flip, aclip, aclip-eff, slip),
measured side by side in one run: optimiser-step time and peak memory relative to CLIP, FLOPs per
step, and the share of the step spent in the masking machinery.

    python benchmarks/bench_step.py                                  # ACLIP-Tiny at its demo batch (64), CPU
    python benchmarks/bench_step.py --model ViT-B-16 --batch 8 --rounds 3 --threads 1
    python benchmarks/bench_step.py --device cuda --model ViT-B-16 --batch 128 --precision bf16

What is timed is the training loop's own step (``aclip_kernels.train.step.train_step``: EMA scoring
and targets for aclip*, the online forward and backward, AdamW, schedule, logit-scale clamp, EMA
update), on models built by the loop's own ``build_step`` and one batch per method made by the
loop's own data pipeline (the embedded set, same seed and samples; each method's own views). Data
loading is not timed. Methods alternate step by step (the order rotates every round), ``--rounds``
rounds after ``--warmup`` steps each; the tables give medians.

Memory: the method's persistent state (parameters and buffers of the trained model and of the EMA
copy, AdamW state, the batch; gradients are set to None at the end of every step) plus the peak of
what the step allocates on top of it: torch.profiler's memory events on the CPU (live allocations
summed in time order), the allocator's peak on CUDA (max_memory_allocated minus what was allocated
before the step).

FLOPs: ``torch.utils.flop_counter.FlopCounterMode`` over one step (matmuls, convolutions and
attention, forward and backward, the EMA forward included; elementwise work, the optimiser and the
aclip_kernels ops count as 0).

Masking machinery, from torch.profiler over ``--profile-steps`` steps: the union of the time
ranges of the ``aclip_kernels::*`` ops (cls_attention scoring, attentive_mask / random_mask
alignment + selection + gather, the attentive_mask backward scatter) and of the Python around them
(the EMA scorer's per-block [CLS]-row hooks and the patched patch-dropout module, labelled here as
``masking/score_hook`` and ``masking/patch_dropout``). The EMA encoder's own forward (the full-token
attention and MLPs the scores come from) is *not* counted as masking: it is reported as its own
phase (``ema_scoring``), beside forward, backward, optimizer and ema_update. On CUDA the share is
the GPU kernel time launched inside those ranges over the step time; on the CPU, the ranges' wall
time over the profiled step's wall time.
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Dict, List

import torch

from aclip_kernels.benchmarking import RESULTS, environment, peak_bytes, pyplot, save_figure, synchronize, write_json
METHODS = ("clip", "flip", "aclip", "aclip-eff", "slip")
# The A-CLIP paper (ViT-B/16, YFCC-15M, Table 6): training time and GPU memory relative to CLIP.
PAPER_TIME = {"clip": 1.00, "slip": 2.67, "aclip": 1.16, "aclip-eff": 0.86}
PAPER_MEMORY_GB = {"clip": 14, "slip": 30, "aclip": 14, "aclip-eff": 13}
TARGETS = {"aclip_time": 1.10, "aclip_eff_time": 0.80, "masking_share": 0.02, "aclip_memory": 1.00}
PHASES = ("ema_scoring", "forward", "backward", "optimizer", "ema_update")


# ---- building: the training loop's own model and data -------------------------------------------
def build(method: str, args, device: torch.device):
    from aclip_kernels.train.augment import make_transform
    from aclip_kernels.train.data import make_train_loader
    from aclip_kernels.train.loop import TrainConfig
    from aclip_kernels.train.step import build_step
    cfg = TrainConfig(method=method, model=args.model, batch_size=args.batch, image_size=args.image_size,
                      steps=10 ** 6, warmup=1, device=device.type, precision=args.precision, workers=0,
                      seed=0, progress=False, quiet=True, evaluate=False)
    state = build_step(cfg, device)
    loader = make_train_loader("embedded", make_transform(method, state.size), state.tokenizer,
                               micro_batch=args.batch, rank=0, world=1, seed=0, start=0, workers=0,
                               source_kwargs=dict(image_size=2 * state.size, num_classes=10,
                                                  samples_per_class=args.batch // 10 + 1))
    batch = next(iter(loader))
    batch.pop("skipped", None)
    batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
    return state, batch


def persistent_bytes(state, batch) -> Dict[str, int]:
    """Bytes of what lives across steps: parameters + buffers (model, EMA), AdamW state, the batch."""
    seen = set()

    def size(tensors) -> int:
        total = 0
        for t in tensors:
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in seen:
                seen.add(t.untyped_storage().data_ptr())
                total += t.untyped_storage().nbytes()
        return total
    model = size(list(state.model.parameters()) + list(state.model.buffers()))
    ema = size(list(state.ema.parameters()) + list(state.ema.buffers())) if state.ema is not None else 0
    optim = size(v for s in state.optimizer.state.values() for v in s.values())
    data = size(batch.values())
    return {"model": model, "ema": ema, "optimizer": optim, "batch": data, "total": model + ema + optim + data}


# ---- measuring -----------------------------------------------------------------------------------
class Runner:
    """One method: its state, its batch and a step counter."""

    def __init__(self, method, state, batch):
        self.method, self.state, self.batch, self.steps = method, state, batch, 0

    def step(self):
        from aclip_kernels.train.step import train_step
        train_step(self.state, self.batch, self.steps)
        self.steps += 1


def time_rounds(runners: Dict[str, Runner], device, rounds: int, warmup: int, inner: int) -> Dict[str, List[float]]:
    for r in runners.values():
        for _ in range(warmup):
            r.step()
    names = list(runners)
    samples = {n: [] for n in names}
    for i in range(rounds):
        order = names[i % len(names):] + names[:i % len(names)]      # rotate: no fixed neighbours
        for n in order:
            synchronize(device)
            t0 = time.perf_counter()
            for _ in range(inner):
                runners[n].step()
            synchronize(device)
            samples[n].append((time.perf_counter() - t0) / inner)
    return samples


def step_flops(runner: Runner) -> int:
    from torch.utils.flop_counter import FlopCounterMode
    with FlopCounterMode(display=False) as counter:
        runner.step()
    return int(counter.get_total_flops())


@contextlib.contextmanager
def label_masking_python():
    """Label the Python around the aclip_kernels ops (the scorer's per-block hooks, the patched
    patch-dropout module) for the profiler, for the duration of the profile only."""
    from torch.profiler import record_function
    from aclip_kernels.integrations import patch_dropout, scorer
    saved = {"_mha_pre_hook": scorer._mha_pre_hook, "_timm_hook": scorer._timm_hook}

    def labelled_factory(factory):
        @functools.wraps(factory)
        def make(*a, **k):
            hook = factory(*a, **k)

            def run(*args, **kwargs):
                with record_function("masking/score_hook"):
                    return hook(*args, **kwargs)
            return run
        return make
    forward = patch_dropout.AttentivePatchDropout.forward

    def labelled_forward(self, x):
        if not self.training or (self._masking is None and self.prob == 0.0):
            return forward(self, x)                        # a pass-through, no masking work
        with record_function("masking/patch_dropout"):
            return forward(self, x)
    try:
        for name, factory in saved.items():
            setattr(scorer, name, labelled_factory(factory))
        patch_dropout.AttentivePatchDropout.forward = labelled_forward
        yield
    finally:
        for name, factory in saved.items():
            setattr(scorer, name, factory)
        patch_dropout.AttentivePatchDropout.forward = forward


def _union_us(ranges) -> float:
    total, end = 0.0, float("-inf")
    for a, b in sorted(ranges):
        if b > end:
            total += b - max(a, end)
            end = b
    return total


def _is_masking(name: str) -> bool:
    return "aclip_kernels" in name or name.startswith("masking/")


def profile_step(runner: Runner, device, steps: int) -> dict:
    """Share of the step in each phase and in the masking machinery (see the module docstring)."""
    from torch.profiler import ProfilerActivity, profile, record_function
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    # acc_events: one cycle either way; it only silences torch 2.11's spurious "clears events" warning
    with label_masking_python(), profile(activities=activities, acc_events=True) as prof:
        for _ in range(steps):
            with record_function("bench/step"):
                runner.step()
            synchronize(device)
    # CPU-side events only: with CUDA activity, record_function ranges are mirrored as GPU annotations
    # and kernels (whose C++ names may contain "aclip_kernels") are attached to the ops that launched them
    cpu = torch.autograd.DeviceType.CPU
    events = [e for e in prof.events() if getattr(e, "device_type", cpu) == cpu]
    step_us = sum(e.time_range.elapsed_us() for e in events if e.name == "bench/step")
    phases = {p: sum(e.time_range.elapsed_us() for e in events if e.name == f"step/{p}") / step_us for p in PHASES}
    masking = [e for e in events if _is_masking(e.name)]
    # the outermost masking ranges (a range inside another one is already counted)
    outer = [e for e in masking if not _has_masking_ancestor(e)]
    result = {"profiled_steps": steps, "profiled_step_ms": step_us / steps / 1e3, "phase_share": phases,
              "masking_share_cpu": _union_us((e.time_range.start, e.time_range.end) for e in masking) / step_us,
              "masking_ops": sorted({e.name for e in masking})}
    by_kind = {"scoring": ("cls_attention", "score_hook"), "select_gather": ("attentive_mask", "random_mask",
               "patch_dropout"), "backward_scatter": ("Backward", "backward")}
    kinds = {}
    for kind, keys in by_kind.items():
        chosen = [e for e in masking if any(k in e.name for k in keys)
                  and not (kind == "select_gather" and ("Backward" in e.name or "backward" in e.name))]
        kinds[kind] = _union_us((e.time_range.start, e.time_range.end) for e in chosen) / step_us
    result["masking_share_cpu_by_kind"] = kinds
    if device.type == "cuda":
        dev = lambda e: getattr(e, "device_time_total", None) or getattr(e, "cuda_time_total", 0)   # noqa: E731
        result["masking_device_ms"] = sum(dev(e) for e in outer) / steps / 1e3
    return result


def _has_masking_ancestor(e) -> bool:
    p = e.cpu_parent
    while p is not None:
        if _is_masking(p.name):
            return True
        p = p.cpu_parent
    return False


def measure(args) -> dict:
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    runners = {}
    for m in args.methods:
        t0 = time.perf_counter()
        runners[m] = Runner(m, *build(m, args, device))
        print(f"built {m} in {time.perf_counter() - t0:.1f} s", file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    samples = time_rounds(runners, device, args.rounds, args.warmup, args.inner)
    print(f"timed {args.rounds} rounds in {time.perf_counter() - t0:.1f} s", file=sys.stderr, flush=True)
    rows = {}
    for m, r in runners.items():
        row = {"method": m, "median_ms": statistics.median(samples[m]) * 1e3,
               "min_ms": min(samples[m]) * 1e3, "max_ms": max(samples[m]) * 1e3,
               "samples_ms": [s * 1e3 for s in samples[m]]}
        pers = persistent_bytes(r.state, r.batch)
        peak = peak_bytes(r.step, device)   # one step, on top of what was live before it
        row["memory_bytes"] = {"persistent": pers, "step_peak": peak, "total_peak": pers["total"] + peak}
        if not args.no_flops:
            row["flops"] = step_flops(r)
        if args.profile_steps:
            row["profile"] = profile_step(r, device, args.profile_steps)
            if device.type == "cuda":
                row["profile"]["masking_share_device"] = row["profile"]["masking_device_ms"] / row["median_ms"]
        row["tokens_online"] = _online_tokens(r)
        rows[m] = row
        print(f"measured {m}", file=sys.stderr, flush=True)
    base = rows.get("clip")
    for row in rows.values():
        if base is not None:
            row["time_vs_clip"] = row["median_ms"] / base["median_ms"]
            row["memory_vs_clip"] = row["memory_bytes"]["total_peak"] / base["memory_bytes"]["total_peak"]
            row["step_memory_vs_clip"] = row["memory_bytes"]["step_peak"] / base["memory_bytes"]["step_peak"]
            if "flops" in row:
                row["flops_vs_clip"] = row["flops"] / base["flops"]
        if "profile" in row:
            p = row["profile"]
            row["masking_share"] = p.get("masking_share_device", p["masking_share_cpu"])
    size = runners[args.methods[0]].state.size
    env = environment(device)
    env["shared_machine"] = args.shared_note
    config = {"model": args.model, "batch": args.batch, "image_size": size, "precision": _precision(args, device),
              "dtype_online": "bfloat16 autocast" if _precision(args, device) == "bf16" else "float32",
              "methods": list(args.methods), "rounds": args.rounds, "warmup": args.warmup, "inner": args.inner,
              "profile_steps": args.profile_steps, "keep": 0.5, "block": 2,
              "command": " ".join(["python", "benchmarks/bench_step.py"] + [f"'{a}'" if " " in a else a
                                                                               for a in args.argv]),
              "shapes": {m: {k: list(v.shape) for k, v in r.batch.items() if isinstance(v, torch.Tensor)}
                         for m, r in runners.items()}}
    result = {"environment": env, "config": config, "results": list(rows.values())}
    result["targets"] = targets(rows)
    return result


def _online_tokens(r: Runner):
    """Tokens per image the online encoder sees (after masking), read from the model config."""
    visual = r.state.clip.visual
    grid = visual.grid_size if hasattr(visual, "grid_size") else None
    if grid is None:
        return None
    n = grid[0] * grid[1]
    masked = r.method in ("flip", "aclip", "aclip-eff")
    return 1 + (n // 2 if masked else n)


def _precision(args, device) -> str:
    return args.precision if args.precision != "auto" else ("bf16" if device.type == "cuda" else "fp32")


def targets(rows) -> dict:
    out = {}

    def verdict(name, value, limit, what):
        if value is None:
            return
        hit = value <= limit
        out[name] = {"value": value, "target": limit, "hit": hit, "margin": value - limit, "what": what}
    a, e = rows.get("aclip"), rows.get("aclip-eff")
    if a is not None and "time_vs_clip" in a:
        verdict("aclip_time", a["time_vs_clip"], TARGETS["aclip_time"], "aclip step time / clip")
        verdict("aclip_memory", a["memory_vs_clip"], TARGETS["aclip_memory"], "aclip peak memory / clip")
    if e is not None and "time_vs_clip" in e:
        verdict("aclip_eff_time", e["time_vs_clip"], TARGETS["aclip_eff_time"], "aclip-eff step time / clip")
    if a is not None and "masking_share" in a:
        verdict("masking_share", a["masking_share"], TARGETS["masking_share"], "masking machinery / aclip step")
    return out


# ---- writing -------------------------------------------------------------------------------------
def explain(result) -> List[str]:
    """Why each target is hit or missed, from the profile and the FLOP counts."""
    rows = {r["method"]: r for r in result["results"]}
    lines = []
    for name, t in result["targets"].items():
        status = "**hit**" if t["hit"] else "**missed**"
        if name == "masking_share":
            lines.append(f"- masking machinery <= {t['target']:.0%} of an aclip step: {status} "
                         f"({t['value']:.2%}; by {abs(t['margin']) * 100:.2f} points).")
            continue
        if name == "aclip_memory":
            a, c = rows["aclip"]["memory_bytes"], rows["clip"]["memory_bytes"]
            mib = 2 ** 20
            lines.append(f"- aclip peak memory <= CLIP's: {status} ({t['value']:.2f}x, {t['margin']:+.2f}). "
                         f"Persistent state {a['persistent']['total'] / mib:.0f} vs {c['persistent']['total'] / mib:.0f} MiB "
                         f"(the EMA copy {a['persistent']['ema'] / mib:.0f} MiB and the SSL heads' weights + AdamW state); "
                         f"what the step allocates on top: {a['step_peak'] / mib:.0f} vs {c['step_peak'] / mib:.0f} MiB "
                         f"({rows['aclip']['step_memory_vs_clip']:.2f}x)."
                         + ("" if t["hit"] else " Why: most of the excess is the EMA copy and the heads with their AdamW state, "
                            "fixed in bytes, while the activations grow with the batch: at small batches the "
                            "persistent state decides the ratio."))
            continue
        method = "aclip" if name == "aclip_time" else "aclip-eff"
        r = rows[method]
        why = ""
        if "profile" in r:
            ph = r["profile"]["phase_share"]
            why = (f" Profile of the {method} step: EMA scoring forward {ph['ema_scoring']:.0%}, online forward "
                   f"{ph['forward']:.0%}, backward {ph['backward']:.0%}, optimizer {ph['optimizer']:.0%}, EMA update "
                   f"{ph['ema_update']:.0%}, masking machinery {r['masking_share']:.1%}.")
        flops = f" FLOPs {r['flops_vs_clip']:.2f}x CLIP's." if "flops_vs_clip" in r else ""
        cause = ""
        if not t["hit"] and "flops_vs_clip" in r and "profile" in r:
            ema = "the EMA forward at half resolution" if method == "aclip-eff" else "the full-token EMA forward"
            cause = (f" Why: the time follows the FLOPs; two online views at keep {result['config']['keep']:.0%} "
                     f"carry as many image tokens as CLIP's one view, so the step does CLIP's work plus {ema} "
                     f"({r['profile']['phase_share']['ema_scoring']:.0%} of the step, no gradient) and the SSL heads, "
                     f"while the masking machinery is {r['masking_share']:.1%}. Meeting {t['target']:.2f}x needs less "
                     f"compute per step (a cheaper EMA pass, a lower keep), not faster masking kernels.")
        lines.append(f"- {method} step <= {t['target']:.2f}x CLIP: {status} ({t['value']:.2f}x, by "
                     f"{abs(t['margin']):.2f}).{flops}{why}{cause}")
    return lines


def markdown(result) -> str:
    env, cfg = result["environment"], result["config"]
    mib = 2 ** 20
    lines = [f"### Training step, {cfg['model']} at {cfg['image_size']} px, batch {cfg['batch']}, {cfg['precision']}",
             "",
             f"{env['machine']}; {env['device']} ({env['threads']} threads), torch {env['torch']}, triton {env['triton']}, "
             f"{env['date']}, commit {env['git_commit']}. Medians of {cfg['rounds']} interleaved rounds "
             f"(x{cfg['inner']} steps, methods alternating, order rotating) after {cfg['warmup']} warm-up steps."
             + (f" {env['shared_machine']}" if env.get("shared_machine") else ""), "",
             "| method | step ms: median (min-max) | time vs CLIP | paper | GFLOPs/step | FLOPs vs CLIP | peak MiB "
             "(persistent + step) | memory vs CLIP | step-alloc vs CLIP | masking share |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in result["results"]:
        m = r["memory_bytes"]
        paper = f"{PAPER_TIME[r['method']]:.2f}x" if r["method"] in PAPER_TIME else "-"
        fl = f"{r['flops'] / 1e9:.1f}" if "flops" in r else "-"
        flr = f"{r['flops_vs_clip']:.2f}x" if "flops_vs_clip" in r else "-"
        share = f"{r['masking_share']:.2%}" if "masking_share" in r else "-"
        lines.append(f"| {r['method']} | {r['median_ms']:.1f} ({r['min_ms']:.0f}-{r['max_ms']:.0f}) | {r.get('time_vs_clip', float('nan')):.2f}x | {paper} "
                     f"| {fl} | {flr} | {m['total_peak'] / mib:.0f} ({m['persistent']['total'] / mib:.0f} + "
                     f"{m['step_peak'] / mib:.0f}) | {r.get('memory_vs_clip', float('nan')):.2f}x | "
                     f"{r.get('step_memory_vs_clip', float('nan')):.2f}x | {share} |")
    if any("profile" in r for r in result["results"]):
        lines += ["", "Share of the profiled step per phase (torch.profiler ranges; masking machinery split into "
                  "scoring / selection+gather / backward scatter):", "",
                  "| method | ema_scoring | forward | backward | optimizer | ema_update | masking: scoring | "
                  "select+gather | bwd scatter |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for r in result["results"]:
            if "profile" not in r:
                continue
            ph, k = r["profile"]["phase_share"], r["profile"]["masking_share_cpu_by_kind"]
            lines.append(f"| {r['method']} | " + " | ".join(f"{ph[p]:.1%}" for p in PHASES) + " | "
                         + " | ".join(f"{k[x]:.2%}" for x in ("scoring", "select_gather", "backward_scatter")) + " |")
    lines += ["", "Targets (issue 7):", ""] + explain(result)
    lines += ["", "Memory = persistent state (weights + buffers of the model and the EMA copy, AdamW state, the "
              "batch) + the peak the step allocates on top of it (CPU: torch.profiler memory events; CUDA: the "
              "allocator's peak). FLOPs: torch.utils.flop_counter over one step (matmul/conv/attention, forward + "
              "backward + EMA forward). Masking machinery = the aclip_kernels ops (cls_attention, attentive_mask / "
              "random_mask, the backward scatter) and the Python hooks around them; the EMA encoder's own forward "
              "is the ema_scoring phase, not masking."
              + (" Share on CUDA: kernel time under those ranges / step time; per-kind split from the CPU ranges."
                 if "cuda" in env["device"] else " Share on the CPU: wall time of those ranges / profiled step."),
              "Paper = A-CLIP (ICCV 2023) Table 6, ViT-B/16 on GPUs: time relative to CLIP; memory "
              "14/13/14/30 GB for CLIP/A-CLIP-eff/A-CLIP/SLIP.", ""]
    return "\n".join(lines)


def plot(result, path: Path) -> None:
    plt = pyplot()
    env, cfg = result["environment"], result["config"]
    rows = result["results"]
    names = [r["method"] for r in rows]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    x = range(len(rows))
    ax = axes[0]
    bars = ax.bar(x, [r.get("time_vs_clip", 0) for r in rows], color="tab:blue", label="measured step time")
    ax.bar_label(bars, fmt="%.2fx", fontsize=7)
    ax.scatter([i for i, r in enumerate(rows) if "flops_vs_clip" in r],
               [r["flops_vs_clip"] for r in rows if "flops_vs_clip" in r], color="tab:orange", marker="D",
               zorder=3, label="FLOPs")
    ax.scatter([i for i, r in enumerate(rows) if r["method"] in PAPER_TIME],
               [PAPER_TIME[r["method"]] for r in rows if r["method"] in PAPER_TIME], color="black", marker="_",
               s=400, zorder=3, label="paper (A-CLIP Table 6)")
    ax.axhline(1.0, color="gray", lw=0.8)
    ax.set(xticks=list(x), xticklabels=names, ylabel="relative to CLIP", title="optimiser step time")
    ax.legend(fontsize=7)
    ax = axes[1]
    mib = 2 ** 20
    pers = [r["memory_bytes"]["persistent"]["total"] / mib for r in rows]
    step = [r["memory_bytes"]["step_peak"] / mib for r in rows]
    ax.bar(x, pers, color="tab:gray", label="persistent (weights, EMA, AdamW, batch)")
    bars = ax.bar(x, step, bottom=pers, color="tab:green", label="peak allocated by the step")
    ax.bar_label(bars, labels=[f"{r.get('memory_vs_clip', 0):.2f}x" for r in rows], fontsize=7)
    ax.set(xticks=list(x), xticklabels=names, ylabel="MiB", title="peak memory")
    ax.legend(fontsize=7)
    save_figure(fig, path, f"{cfg['model']} {cfg['image_size']}px, batch {cfg['batch']}, {cfg['precision']} — "
                f"{env['machine']}, {env['date'][:10]}" + (" (shared machine)" if env.get("shared_machine") else ""))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--model", default="ACLIP-Tiny", help="open_clip config or ACLIP-Tiny / ACLIP-Test")
    parser.add_argument("--batch", type=int, default=64, help="images per step (ACLIP-Tiny demo batch: 64)")
    parser.add_argument("--image-size", type=int, default=None, help="override the model config's image size")
    parser.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16"),
                        help="the loop's: auto = bf16 autocast on GPU, fp32 on CPU")
    parser.add_argument("--methods", default=",".join(METHODS), help="comma-separated; clip is the reference")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--inner", type=int, default=1, help="steps per timed sample")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per method first")
    parser.add_argument("--profile-steps", type=int, default=1, help="steps under torch.profiler (0: no profile)")
    parser.add_argument("--no-flops", action="store_true")
    parser.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: leave as is)")
    parser.add_argument("--shared-note", default="", help="a note on the machine, e.g. that it was shared")
    parser.add_argument("--out", default=str(RESULTS))
    parser.add_argument("--name", default=None, help="file stem (default step_<device>_<model>_b<B>_<precision>)")
    parser.add_argument("--no-plot", action="store_true")
    parser.add_argument("--render", metavar="JSON", help="only rewrite the markdown and plot of a results JSON")
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    if args.render:
        path = Path(args.render)
        result = json.loads(path.read_text())
        path.with_suffix(".md").write_text(markdown(result))
        if not args.no_plot:
            plot(result, path.with_suffix(".png"))
        print(markdown(result))
        return 0
    args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = set(args.methods) - set(METHODS)
    if unknown:
        parser.error(f"--methods: unknown {sorted(unknown)}; choose from {METHODS}")
    try:
        import open_clip  # noqa: F401  (the training loop's models are open_clip's)
    except ImportError:
        print("bench_step: open_clip is not installed; the training loop builds its models with open_clip, so the "
              "step-level table cannot run here (pip install open_clip_torch, or carry its wheel in .whl/).",
              file=sys.stderr)
        return 3
    device = torch.device(args.device)
    threads = torch.get_num_threads()
    try:
        result = measure(args)
    finally:
        torch.set_num_threads(threads)          # when run in-process (tests), leave the caller's setting
    stem = args.name or (f"step_{device.type}_{args.model.replace('/', '-')}_b{args.batch}_"
                         f"{result['config']['precision']}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / f"{stem}.json", result)
    text = markdown(result)
    (out / f"{stem}.md").write_text(text)
    if not args.no_plot:
        plot(result, out / f"{stem}.png")
    print(text, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Timing helpers shared by the benchmarks: interleaved medians and the environment record."""
from __future__ import annotations

import datetime
import platform
import statistics
import subprocess
import time
from pathlib import Path
from typing import Callable, Dict

import torch

from ._library import compiled_backends

__all__ = ["time_interleaved", "environment", "synchronize", "cpu_peak_bytes", "peak_bytes", "targets_line"]


def synchronize(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def time_interleaved(methods: Dict[str, Callable], device, rounds: int = 15, inner: int = 3,
                     warmup: int = 2) -> Dict[str, float]:
    """Median seconds per call of each no-argument callable, timing every method once per round so
    that all of them see the same machine noise."""
    for fn in methods.values():          # JIT, autotuning, allocator
        for _ in range(warmup):
            fn()
    samples = {name: [] for name in methods}
    for _ in range(rounds):
        for name, fn in methods.items():
            synchronize(device)
            start = time.perf_counter()
            for _ in range(inner):
                fn()
            synchronize(device)
            samples[name].append((time.perf_counter() - start) / inner)
    return {name: statistics.median(s) for name, s in samples.items()}


def environment(device) -> dict:
    """What a result was measured with: versions, device, threads, git commit, date (UTC)."""
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=Path(__file__).parent).stdout.strip()
    except OSError:
        commit = ""
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    device = torch.device(device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else (platform.processor() or "cpu")
    return {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "torch": torch.__version__, "triton": triton_version, "python": platform.python_version(),
            "device": f"{device.type}: {name}", "threads": torch.get_num_threads(),
            "compiled_backends": list(compiled_backends()), "git_commit": commit}


def cpu_peak_bytes(fn: Callable[[], object]) -> int:
    """Peak bytes of live CPU allocations made while ``fn()`` runs (torch.profiler memory events;
    what existed before the call is not counted)."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True, acc_events=True) as prof:
        out = fn()
        del out
    events = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
                    key=lambda e: e.start_ns())
    live = peak = 0
    for e in events:
        live += e.nbytes()
        peak = max(peak, live)
    return peak


def peak_bytes(fn: Callable[[], object], device) -> int:
    """Peak bytes allocated while ``fn()`` runs, on top of what was live before: the caching
    allocator's peak on CUDA, ``cpu_peak_bytes`` on the CPU."""
    device = torch.device(device)
    if device.type != "cuda":
        return cpu_peak_bytes(fn)
    synchronize(device)
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    out = fn()
    synchronize(device)
    del out
    return torch.cuda.max_memory_allocated(device) - before


def targets_line(targets) -> str:
    """One markdown line for [{target, measured, met}]: each target with its measurement, met or missed."""
    return "Targets: " + "; ".join(f"{t['target']}: {t['measured']} — **{'met' if t['met'] else 'missed'}**"
                                   for t in targets) + "."

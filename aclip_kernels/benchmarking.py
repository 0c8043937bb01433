"""The benchmark harness, shared by the op suite (``benchmarks/ops``, pytest-benchmark), its renderer
(``benchmarks/render.py``) and the experiment scripts (step table, scorer, ablation): the environment
record, GPU-correct timing, bytes and bandwidth, markdown tables and plots.

GPU timing (``CudaEventClock`` + ``cache_flusher``) follows ``triton.testing.do_bench``: the L2 is
flushed before every timed call by writing a buffer larger than it, and the call is timed by CUDA
events recorded on the stream around it, so the figure is GPU time, not host launch time.
"""
from __future__ import annotations

import datetime
import os
import platform
import statistics
import subprocess
import time
from pathlib import Path
from typing import Callable, Dict, Iterable, Optional, Sequence

import torch

__all__ = ["DTYPES", "RESULTS", "PEAK_HBM_TBPS", "positive_int", "positive_ints", "time_interleaved", "environment", "machine", "cpu_info", "source_commit", "synchronize",
           "cpu_peak_bytes", "peak_bytes", "targets_line", "CudaEventClock", "cache_flusher", "copy_gbps",
           "peak_hbm_tbps", "bandwidth", "markdown_table", "pyplot", "save_figure", "write_json"]

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# the repository's benchmarks/results (the benchmarks run from a source checkout)
RESULTS = Path(__file__).resolve().parents[1] / "benchmarks" / "results"
# Peak HBM bandwidth (TB/s, vendor data sheets), matched by substring of the device name, most specific first.
PEAK_HBM_TBPS = {"H200": 4.8, "H100 SXM": 3.35, "H100 80GB HBM3": 3.35, "H100 PCIe": 2.0, "H100 NVL": 3.9,
                 "A100-SXM4-80GB": 2.039, "A100 80GB": 2.039, "A100-PCIE-40GB": 1.555, "A100-SXM4-40GB": 1.555,
                 "MI300X": 5.3, "L40S": 0.864, "RTX 4090": 1.008}
L2_FLUSH_BYTES = 256 * 2 ** 20     # do_bench's buffer: above any GPU's L2 (H200: 50 MB, MI300X: 256 MB LLC)
CPU_FLUSH_BYTES = int(os.environ.get("ACLIP_BENCH_CPU_FLUSH_MB", "64")) * 2 ** 20


def positive_int(text: str) -> int:
    """A benchmark option's positive integer; ValueError otherwise (argparse names the option)."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise ValueError(f"expected a positive integer, got {text!r}")
    return value


def positive_ints(text: str) -> list:
    """A benchmark option's comma-separated positive integers: "32,64" -> [32, 64]; ValueError otherwise."""
    try:
        values = [int(v) for v in text.split(",")]
    except ValueError:
        values = []
    if not values or min(values) < 1:
        raise ValueError(f"expected comma-separated positive integers, got {text!r}")
    return values


def synchronize(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def time_interleaved(methods: Dict[str, Callable], device, rounds: int = 15, inner: int = 3,
                     warmup: int = 2) -> Dict[str, float]:
    """Median wall seconds per call of each no-argument callable, timing every method once per
    round so that all of them see the same machine noise (host-side timing: for GPU kernel time
    use the op suite's ``CudaEventClock``)."""
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


# ---- timing on the GPU ---------------------------------------------------------------------------

class _EventReading:
    """One reading of ``CudaEventClock``: a recorded event; the difference of two is GPU seconds."""
    __slots__ = ("event",)

    def __init__(self, event):
        self.event = event

    def __sub__(self, start: "_EventReading") -> float:
        self.event.synchronize()
        return start.event.elapsed_time(self.event) / 1e3


class CudaEventClock:
    """A clock for pytest-benchmark (``@pytest.mark.benchmark(timer=CudaEventClock())``) that reads
    GPU time: each reading records a CUDA event on the current stream and does not wait, and
    ``end - start`` waits for the end event and returns the seconds between the two events, as
    ``triton.testing.do_bench`` measures (work queued before the start event, such as the flush of
    ``cache_flusher``, is not counted)."""
    __name__ = "CudaEventClock"

    def __call__(self) -> _EventReading:
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return _EventReading(event)

    def __repr__(self) -> str:
        return "CudaEventClock"


def cache_flusher(device, nbytes: Optional[int] = None) -> Callable[[], None]:
    """A pytest-benchmark ``setup=``: before each timed call, overwrite a buffer larger than the
    last-level cache (GPU: 256 MiB, queued on the stream; CPU: ``ACLIP_BENCH_CPU_FLUSH_MB``, 64 by
    default), so that no method finds its inputs in cache left by the method before it."""
    device = torch.device(device)
    size = nbytes or (L2_FLUSH_BYTES if device.type == "cuda" else CPU_FLUSH_BYTES)
    buffer = torch.empty(size // 4, dtype=torch.int32, device=device)

    def flush():
        buffer.zero_()
    return flush


def copy_gbps(device, nbytes: int = 256 * 2 ** 20, rounds: int = 5) -> float:
    """A STREAM-like copy measured now: GB/s of ``dst.copy_(src)`` over ``nbytes`` (read + write
    counted), the best of ``rounds`` (GPU: CUDA-event time); the reference for the bandwidth share on devices without a
    known peak (the CPU)."""
    device = torch.device(device)
    src = torch.ones(nbytes // 4, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    clock = CudaEventClock() if device.type == "cuda" else time.perf_counter
    best = float("inf")
    for _ in range(rounds + 1):
        synchronize(device)
        start = clock()
        dst.copy_(src)
        best = min(best, clock() - start)
    return 2 * nbytes / best / 1e9


def peak_hbm_tbps(device) -> Optional[float]:
    """The data-sheet HBM bandwidth of a known GPU (``PEAK_HBM_TBPS``), else None."""
    device = torch.device(device)
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((tbps for key, tbps in PEAK_HBM_TBPS.items() if key in name), None)


def bandwidth(bytes_moved: int, seconds: float, device, copy_rate_gbps: Optional[float] = None) -> dict:
    """``bytes_moved`` in ``seconds`` as GB/s and as a share of the device's peak HBM bandwidth (a
    known GPU) and of a copy measured in the same run (``copy_gbps``, when given)."""
    gbps = bytes_moved / seconds / 1e9
    info = {"bytes_moved": int(bytes_moved), "GB_per_s": gbps}
    peak = peak_hbm_tbps(device)
    if peak:
        info.update(peak_hbm_TB_per_s=peak, share_of_peak_hbm=gbps / (peak * 1e3))
    if copy_rate_gbps:
        info.update(copy_GB_per_s=copy_rate_gbps, share_of_copy=gbps / copy_rate_gbps)
    return info


# ---- what a result was measured with ----------------------------------------------------------------

def cpu_info() -> tuple:
    """(CPU model name, cores this process may run on)."""
    cpu = platform.processor() or "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return cpu, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


def machine(device="cpu") -> str:
    """The CPU model and core count (and the GPU, on CUDA), for result labels."""
    text = "{}, {} cores".format(*cpu_info())
    device = torch.device(device)
    if device.type == "cuda":
        text = f"{torch.cuda.get_device_name(device)} + {text}"
    return text


def source_commit(package_dir: Path) -> str:
    """The short git commit of the library at ``package_dir`` when it runs from a git checkout (an
    editable install), else "" (an installed copy: its commit is not knowable from here)."""
    try:
        tracked = subprocess.run(["git", "ls-files", "--error-unmatch", "__init__.py"], capture_output=True,
                                 cwd=package_dir).returncode == 0
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=package_dir).stdout.strip() if tracked else ""
    except OSError:
        return ""


def environment(device) -> dict:
    """What a result was measured with: versions, device, machine, threads, git commit, date (UTC)."""
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    import aclip_kernels
    commit = source_commit(Path(aclip_kernels.__file__).parent)
    device = torch.device(device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else machine(device).split(",")[0]
    return {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "torch": torch.__version__, "triton": triton_version, "python": platform.python_version(),
            "device": f"{device.type}: {name}", "machine": machine(device), "threads": torch.get_num_threads(),
            "compiled_backends": list(aclip_kernels.compiled_backends()), "git_commit": commit,
            "aclip_kernels": str(Path(aclip_kernels.__file__).parent)}


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


# ---- tables, plots, files ---------------------------------------------------------------------------

def targets_line(targets) -> str:
    """One markdown line for [{target, measured, met}]: each target with its measurement, met or missed."""
    return "Targets: " + "; ".join(f"{t['target']}: {t['measured']} — **{'met' if t['met'] else 'missed'}**"
                                   for t in targets) + "."


def markdown_table(header: Sequence[str], rows: Iterable[Sequence[object]], numeric: Sequence[bool] = ()) -> list:
    """Lines of a markdown table; columns flagged in ``numeric`` are right-aligned."""
    align = ["---:" if i < len(numeric) and numeric[i] else "---" for i in range(len(header))]
    return (["| " + " | ".join(header) + " |", "|" + "|".join(align) + "|"]
            + ["| " + " | ".join(str(c) for c in row) + " |" for row in rows])


def pyplot():
    """matplotlib.pyplot on the non-interactive Agg backend."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def save_figure(fig, path, title: str, dpi: int = 110, rect=(0, 0, 1, 1)) -> None:
    """Give ``fig`` its title (say the device and date in it), lay it out in ``rect``, write it, close it."""
    fig.suptitle(title, fontsize=9)
    fig.tight_layout(rect=rect)
    fig.savefig(path, dpi=dpi)
    pyplot().close(fig)


def write_json(path, result) -> None:
    """``result`` as indented JSON, written through a temporary file (a crash leaves the old one)."""
    import json
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    os.replace(tmp, path)

"""The CPU attentive_mask against the index_select floor (copying the same prefix and kept rows with
known indices), with cold caches: before every timed call a buffer larger than the last-level cache
is written, and every round runs the methods in a fresh random order, so that neither the cache
state nor the order favours a method. ViT-B/16 shapes (14x14 patches + 1 prefix token, D=768),
A-CLIP's settings (2x2 units, keep 0.5, a random box per view), 1 and 2 threads.

    python benchmarks/cpu_select_floor.py                      # B=32x2 and 64x2, fp32 and bf16
    python benchmarks/cpu_select_floor.py --images 32 --dtypes fp32 --rounds 20
    python benchmarks/cpu_select_floor.py --out benchmarks/results/cpu_select_floor   # + .json and .md

Methods: ``attentive_mask`` (the public op, backend "cpu"), ``index_select floor``, and
``attentive_mask D=8`` (the same call on an x of width 8: the box alignment, pooling and selection
with almost no copy). The table gives medians and the ratio of the op to the floor side by side.

Outputs of tens of MB are above glibc's mmap threshold: each call would map fresh pages and take a page
fault per 4 KB of output, which at 64x2 images costs more than the copy and swings between runs. So,
as in a training loop whose allocator reuses memory, the script asks glibc (``mallopt``) to serve
them from a heap it keeps (``--page-faults``: leave the allocator alone).
"""
from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import json
import os
import random
import statistics
import time
from pathlib import Path

import torch

import aclip_kernels as ak
from aclip_kernels.baselines import flat_row_indices, index_select_floor
from aclip_kernels.benchmarking import environment, positive_int, positive_ints
from aclip_kernels.testing import random_boxes

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
FUSED, FLOOR, SELECT = "attentive_mask", "index_select floor", "attentive_mask D=8"
TARGET = 1.10
GRID, WIDTH, BLOCK, KEEP = 14, 768, 2, 0.5


def llc_bytes() -> int:
    """The last-level cache's size from sysfs (32 MiB when it cannot be read)."""
    sizes = []
    for path in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*/size"):
        text = path.read_text().strip()
        scale = {"K": 1 << 10, "M": 1 << 20}.get(text[-1], 1)
        sizes.append(int(text.rstrip("KM")) * scale)
    return max(sizes, default=32 << 20)


def make_methods(images: int, dtype: torch.dtype, views: int = 2):
    """No-argument callables over the same inputs: the op, the floor, the op on an x of width 8."""
    g = torch.Generator().manual_seed(0)
    bx, n = images * views, GRID * GRID
    x = torch.randn(bx, 1 + n, WIDTH, generator=g).to(dtype)
    x8 = torch.randn(bx, 1 + n, 8, generator=g).to(dtype)
    scores = torch.rand(images, n, generator=g)
    boxes = random_boxes(bx, g)
    _, idx = ak.attentive_mask(x, scores, KEEP, block=BLOCK, boxes=boxes, backend="cpu")
    flat = flat_row_indices(idx, 1, 1 + n)
    return {
        FUSED: lambda: ak.attentive_mask(x, scores, KEEP, block=BLOCK, boxes=boxes, return_indices=False,
                                         backend="cpu"),
        FLOOR: lambda: index_select_floor(x, flat),
        SELECT: lambda: ak.attentive_mask(x8, scores, KEEP, block=BLOCK, boxes=boxes, return_indices=False,
                                          backend="cpu"),
    }


def time_cold(methods, rounds: int, evict: torch.Tensor, seed: int = 0, warmup: int = 2):
    """Median seconds per call of each method, caches evicted before each call, order shuffled per round."""
    for fn in methods.values():
        for _ in range(warmup):
            fn()
    rng = random.Random(seed)
    names = list(methods)
    samples = {name: [] for name in names}
    for r in range(rounds):
        rng.shuffle(names)
        for name in names:
            evict.fill_(r)
            start = time.perf_counter()
            methods[name]()
            samples[name].append(time.perf_counter() - start)
    return {name: statistics.median(s) for name, s in samples.items()}


def measure(images: int, dtype: str, threads: int, rounds: int, evict: torch.Tensor) -> dict:
    torch.set_num_threads(threads)
    times = time_cold(make_methods(images, DTYPES[dtype]), rounds, evict)
    return {"images": images, "views": 2, "dtype": dtype, "threads": threads, "rounds": rounds,
            "median_ms": {name: t * 1e3 for name, t in times.items()}, "fused_vs_floor": times[FUSED] / times[FLOOR]}


def markdown(results) -> str:
    lines = [f"| rows | dtype | threads | {FUSED} ms | {FLOOR} ms | ratio | {SELECT} ms |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for r in results:
        t = r["median_ms"]
        lines.append(f"| {r['images']}x{r['views']} | {r['dtype']} | {r['threads']} | {t[FUSED]:.3f} | "
                     f"{t[FLOOR]:.3f} | {r['fused_vs_floor']:.3f} | {t[SELECT]:.3f} |")
    met = all(r["fused_vs_floor"] <= TARGET for r in results)
    lines += ["", f"Target: {FUSED} within {TARGET:.2f}x the floor in every row — **{'met' if met else 'missed'}**."]
    return "\n".join(lines)


def _option(parse):
    """``parse`` as an argparse type whose ValueError message reaches the usage error."""
    def option(text: str):
        try:
            return parse(text)
        except ValueError as error:
            raise argparse.ArgumentTypeError(str(error)) from None
    return option


def _dtype_names(text: str) -> list:
    names = text.split(",")
    if not all(n in DTYPES for n in names):
        raise argparse.ArgumentTypeError(f"expected comma-separated names of {sorted(DTYPES)}, got {text!r}")
    return names


def keep_heap() -> bool:
    """glibc only: no mmap for large blocks, no trimming of freed memory (M_MMAP_THRESHOLD = -3,
    M_TRIM_THRESHOLD = -1), so that a freed output's pages serve the next call. False elsewhere."""
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        return bool(libc.mallopt(-3, 1 << 30)) and bool(libc.mallopt(-1, 1 << 30))
    except (OSError, AttributeError, TypeError):
        return False


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=_option(positive_ints), default="32,64",
                        help="images per batch (2 views each), comma-separated")
    parser.add_argument("--dtypes", type=_dtype_names, default="fp32,bf16")
    parser.add_argument("--threads", type=_option(positive_ints), default="1,2")
    parser.add_argument("--rounds", type=_option(positive_int), default=30)
    parser.add_argument("--evict-mib", type=_option(positive_int), help="eviction buffer (default: 2x the LLC)")
    parser.add_argument("--page-faults", action="store_true",
                        help="leave glibc's allocator alone (fresh pages, a fault per 4 KB, for large outputs)")
    parser.add_argument("--out", type=Path, help="write OUT.json (results, environment) and OUT.md")
    args = parser.parse_args(argv)
    heap_kept = False if args.page_faults else keep_heap()
    evict_bytes = args.evict_mib << 20 if args.evict_mib else 2 * llc_bytes()
    evict = torch.empty(evict_bytes // 4, dtype=torch.float32)
    load_before = os.getloadavg()[0]
    results = []
    for images in args.images:
        for dtype in args.dtypes:
            for threads in args.threads:
                results.append(measure(images, dtype, threads, args.rounds, evict))
                print(markdown(results[-1:]).split("\n")[2], flush=True)
    load = (load_before, os.getloadavg()[0])
    text = (f"Cold caches ({evict_bytes >> 20} MiB written before every call), {args.rounds} rounds in shuffled "
            f"order, medians; {'large outputs from a kept heap (mallopt)' if heap_kept else 'default allocator'}; "
            f"1-minute load average {load[0]:.1f} before, {load[1]:.1f} after "
            f"({os.cpu_count()} CPUs).\n\n" + markdown(results))
    print("\n" + text)
    if args.out:
        env = environment("cpu")
        env.pop("threads")
        args.out.parent.mkdir(parents=True, exist_ok=True)
        record = {"environment": env, "evict_bytes": evict_bytes, "heap_kept": heap_kept, "load_average": load, "results": results}
        args.out.with_suffix(".json").write_text(json.dumps(record, indent=1) + "\n")
        args.out.with_suffix(".md").write_text(f"# attentive_mask (CPU) against the index_select floor\n\n"
                                               f"{env['date']}, torch {env['torch']}, git {env['git_commit']}. "
                                               + text + "\n")


if __name__ == "__main__":
    main()

"""Op-level benchmark of the attentive_mask forward against the published A-CLIP pipeline, timm-style
argsort + gather, and the index_select floor (copying the same rows with known indices).

Two ways to run it:
    python benchmarks/bench_mask.py [--device cuda --dtype bf16 --images 256]   # table + JSON + markdown
    python -m pytest benchmarks/bench_mask.py --benchmark-only                   # pytest-benchmark suite

The table interleaves the methods round by round in one run and reports medians and ratios
(the machines are noisy); achieved bandwidth counts the bytes that must move: the kept rows read
from x and written to ``kept``.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Callable, Dict, Tuple

import torch

import aclip_kernels as ak
from aclip_kernels.benchmarking import environment, time_interleaved
from aclip_kernels.baselines import aclip_published_mask, flat_row_indices, index_select_floor, timm_style_mask
from aclip_kernels.testing import random_boxes

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
RESULTS = Path(__file__).resolve().parent / "results"


def make_methods(images: int = 64, views: int = 2, grid: int = 14, width: int = 768, dtype=torch.float32,
                 device: str = "cpu", block: int = 2, keep: float = 0.5) -> Tuple[Dict[str, Callable], int]:
    """The methods to time, each a no-argument callable over the same inputs (ViT-B/16 by default),
    and the bytes that must move (the prefix and kept rows, read once and written once)."""
    g = torch.Generator().manual_seed(0)
    bx, n = images * views, grid * grid
    x = torch.randn(bx, 1 + n, width, generator=g).to(device=device, dtype=dtype)
    scores = torch.rand(images, n, generator=g).to(device)
    boxes = random_boxes(bx, g).to(device)
    units = (grid // block) ** 2
    num_units = ak.reference.num_keep_units(keep, units)
    _, idx = ak.attentive_mask(x, scores, keep, block=block, boxes=boxes, backend="torch")
    flat = flat_row_indices(idx, 1, 1 + n)
    patch_scores = scores.repeat(views, 1)
    methods = {}
    for backend in ak.available_backends(device):
        methods[f"attentive_mask[{backend}]"] = (
            lambda b=backend: ak.attentive_mask(x, scores, keep, block=block, boxes=boxes, backend=b))
    methods["published A-CLIP pipeline"] = lambda: aclip_published_mask(x, scores, boxes, num_units, block=block)
    methods["timm-style argsort+gather"] = lambda: timm_style_mask(x, patch_scores, num_units * block * block)
    methods["index_select floor"] = lambda: index_select_floor(x, flat)
    return methods, 2 * flat.numel() * width * x.element_size()


def run_table(args) -> dict:
    dtype = DTYPES[args.dtype]
    methods, bytes_moved = make_methods(args.images, args.views, args.grid, args.width, dtype, args.device,
                                        args.block)
    times = time_interleaved(methods, args.device, args.rounds, args.inner)
    fused = min((t, n) for n, t in times.items() if n.startswith("attentive_mask[") and "torch" not in n)
    rows = []
    for name, t in times.items():
        rows.append({"method": name, "median_ms": t * 1e3, "GB_per_s": bytes_moved / t / 1e9,
                     "time_vs_fused": t / fused[0]})
    return {"environment": environment(args.device),
            "shape": {"images": args.images, "views": args.views, "grid": [args.grid, args.grid],
                      "width": args.width, "dtype": args.dtype, "block": args.block, "keep": 0.5,
                      "boxes": True, "rows": args.images * args.views},
            "rounds": args.rounds, "inner": args.inner, "bytes_moved": bytes_moved, "fused": fused[1],
            "results": rows}


def markdown(result: dict) -> str:
    env, shape = result["environment"], result["shape"]
    lines = [f"attentive_mask forward, {shape['images']} images x {shape['views']} views, grid "
             f"{shape['grid'][0]}x{shape['grid'][1]}, D={shape['width']}, {shape['dtype']}, block {shape['block']}, "
             f"boxes; {env['device']}, torch {env['torch']}, {env['date']} (median of {result['rounds']} "
             "interleaved rounds)", "",
             "| method | median ms | GB/s | time vs fused |", "|---|---:|---:|---:|"]
    for row in result["results"]:
        lines.append(f"| {row['method']} | {row['median_ms']:.3f} | {row['GB_per_s']:.1f} | {row['time_vs_fused']:.2f}x |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="fp32", choices=sorted(DTYPES))
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--views", type=int, default=2)
    parser.add_argument("--grid", type=int, default=14)
    parser.add_argument("--width", type=int, default=768)
    parser.add_argument("--block", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--inner", type=int, default=3)
    parser.add_argument("--out", default=str(RESULTS), help="folder for the JSON and markdown")
    parser.add_argument("--name", default=None, help="file stem (default: mask_<device>_<dtype>)")
    args = parser.parse_args(argv)
    result = run_table(args)
    text = markdown(result)
    print(text)
    stem = args.name or f"mask_{args.device.split(':')[0]}_{args.dtype}_b{args.images}"
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / f"{stem}.md").write_text(text)
    return 0


# ---- pytest-benchmark suite --------------------------------------------------------------------
try:
    import pytest
except ImportError:        # the table above needs no pytest
    pytest = None

if pytest is not None:
    _METHOD_NAMES = ["attentive_mask[" + b + "]" for b in ak.available_backends("cpu")] + [
        "published A-CLIP pipeline", "timm-style argsort+gather", "index_select floor"]

    @pytest.fixture(scope="module")
    def cpu_methods():
        return make_methods(images=16)[0]

    @pytest.mark.parametrize("method", _METHOD_NAMES)
    def test_attentive_mask_forward(benchmark, cpu_methods, method):
        benchmark.group = "attentive_mask forward, ViT-B/16, 16 images x 2 views, fp32, CPU"
        benchmark(cpu_methods[method])


if __name__ == "__main__":
    sys.exit(main())

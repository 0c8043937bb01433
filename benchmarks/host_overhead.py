"""Host overhead of the public ops: ``aclip_kernels.attentive_mask`` (and ``cls_attention``,
``random_mask``) against the raw ``torch.ops`` call of the same backend, with and without autograd,
medians and ratios side by side in one run. The raw call of ``random_mask`` draws its scores too.

    python benchmarks/host_overhead.py [--rounds 200] [--out benchmarks/results]

Backends: ``cpu`` (the compiled CPU op through the default call, no ``backend=`` argument, at shapes
small enough that the kernel costs little next to the host), and ``triton`` with the kernel launch stubbed: the autotuned kernel's ``run`` is replaced
by a no-op, so what is timed is every Python step of a launch except Triton's own launcher (on a
machine without a GPU the Triton ops run CPU tensors under ``TRITON_INTERPRET=1``, set here). The
target of issue #14 is a ratio within 1.3x.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("TRITON_INTERPRET", "1")  # before aclip_kernels.triton is imported

import torch  # noqa: E402

import aclip_kernels as ak  # noqa: E402
from aclip_kernels.backends import resolve_backend  # noqa: E402
from aclip_kernels.benchmarking import environment, positive_int  # noqa: E402
from aclip_kernels.ops._checks import check_mask_args  # noqa: E402

CASES = {  # name: (Bs, views, grid, D, block, boxes, fused)
    "scores": (2, 1, (14, 14), 8, 1, False, False),
    "fused-qk-boxes-b2": (2, 2, (14, 14), 8, 2, True, True),
}


def inputs(case: str) -> dict:
    bs, views, grid, d, block, boxes, fused = CASES[case]
    g = torch.Generator().manual_seed(0)
    n = grid[0] * grid[1]
    kwargs = dict(x=torch.randn(bs * views, 1 + n, d, generator=g), keep=0.5, num_prefix_tokens=1,
                  grid=grid, block=block)
    if fused:
        kwargs.update(q=torch.randn(bs, 2, 8, generator=g), k=torch.randn(bs, 2, 1 + n, 8, generator=g))
    else:
        kwargs["scores"] = torch.randn(bs, n, generator=g)
    if boxes:
        kwargs["boxes"] = torch.tensor([[0.1, 0.1, 0.8, 0.8]]).repeat(bs * views, 1)
    return kwargs


REPEATS = 5  # interleaved measurements of each method; the best median counts (the machine may be shared)
CLOCK = time.thread_time  # CPU time of this thread: a busy machine does not inflate it (--wall: perf_counter)


def median_us(fn, rounds: int, inner: int = 20) -> float:
    for _ in range(20):
        fn()
    samples = []
    for _ in range(rounds):
        start = CLOCK()
        for _ in range(inner):
            fn()
        samples.append((CLOCK() - start) / inner)
    return statistics.median(samples) * 1e6


def raw_op(name: str, backend: str):
    return getattr(torch.ops.aclip_kernels, name if backend == "cpu" else name + "_triton")


def methods(backend: str, case: str, grad: bool):
    """(public call, raw op call) for one backend, case and autograd setting. The cpu backend's public
    call is the default one (``backend=None``, which resolves to cpu here), what a user writes."""
    public_backend = backend
    if backend == "cpu":
        assert resolve_backend(None, torch.device("cpu")) == "cpu", "unset ACLIP_KERNELS_BACKEND"
        public_backend = None
    if case == "cls_attention":
        g = torch.Generator().manual_seed(0)
        q, k = torch.randn(2, 2, 8, generator=g), torch.randn(2, 2, 197, 8, generator=g)
        q, k, op = q.requires_grad_(grad), k.requires_grad_(grad), raw_op("cls_attention", backend)
        return (lambda: ak.cls_attention(q, k, backend=public_backend)), (lambda: op(q, k, 1, 8 ** -0.5, None))
    kw = inputs("scores" if case == "random_mask" else case)
    x = kw.pop("x").requires_grad_(grad)
    args = check_mask_args(x, kw.get("scores"), kw["keep"], kw.get("q"), kw.get("k"), None,
                           kw["num_prefix_tokens"], kw["grid"], kw["block"], kw.get("boxes"), None)
    op, raw_args = raw_op("attentive_mask", backend), tuple(args)
    if case == "random_mask":  # the raw call draws its scores too
        g, grid = torch.Generator().manual_seed(0), kw["grid"]

        def raw():
            scores = torch.rand(x.shape[0], *grid, generator=g)
            return op(x, scores.view(x.shape[0], -1), *raw_args[2:])
        return (lambda: ak.random_mask(x, kw["keep"], grid=grid, generator=g, backend=public_backend)), raw
    return (lambda: ak.attentive_mask(x, **kw, backend=public_backend)), (lambda: op(*raw_args))


def run(rounds: int, only=None) -> list:
    import importlib

    # the modules (the package re-exports functions of the same names)
    triton_mask = importlib.import_module("aclip_kernels.triton.attentive_mask")
    triton_scores = importlib.import_module("aclip_kernels.triton.cls_attention")
    kernels = (triton_mask._mask_fwd_kernel, triton_scores._cls_scores_kernel, triton_scores._combine_kernel)
    rows = []
    backends = [b for b in ("cpu", "triton") if b in ak.available_backends("cpu") and b in (only or (b,))]
    for kernel in kernels:
        kernel.run = lambda *args, **kwargs: None  # the stub: every host step but Triton's launcher
    try:
        for backend in backends:
            for case in (*CASES, "cls_attention", "random_mask"):
                for grad in (False, True):
                    public, raw = methods(backend, case, grad)
                    times = {}
                    for _ in range(REPEATS):  # interleaved, the best median of each
                        for name, fn in (("public", public), ("raw", raw)):
                            t = median_us(fn, rounds)
                            times[name] = min(times.get(name, t), t)
                    rows.append(dict(backend=backend + (" (launch stubbed)" if backend == "triton" else ""),
                                     case=case, autograd=grad, public_us=round(times["public"], 1),
                                     raw_us=round(times["raw"], 1),
                                     ratio=round(times["public"] / times["raw"], 2)))
                    print(json.dumps(rows[-1]), flush=True)
    finally:
        for kernel in kernels:
            del kernel.run
    return rows


def markdown(rows: list, env: dict) -> str:
    lines = ["# Host overhead: public op vs raw torch.ops call", "",
             f"{env['date']}, torch {env['torch']}, triton {env['triton']}, {env['device']}, "
             f"{env['threads']} threads, commit {env['git_commit']}. Medians of {{rounds}} x 20 calls, best of {REPEATS}, "
             f"{'wall-clock' if CLOCK is time.perf_counter else 'CPU time of the calling thread'}.", "",
             "| backend | case | autograd | public (µs) | raw op (µs) | ratio |", "|---|---|---|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['backend']} | {r['case']} | {'yes' if r['autograd'] else 'no'} | {r['public_us']} "
                     f"| {r['raw_us']} | {r['ratio']}x |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=positive_int, default=100)
    parser.add_argument("--out", type=Path, default=None, help="write host_overhead.{json,md} here")
    parser.add_argument("--wall", action="store_true", help="time wall-clock instead of the thread's CPU time")
    parser.add_argument("--backends", nargs="+", choices=("cpu", "triton"), default=None, help="default: both")
    args = parser.parse_args(argv)
    global CLOCK
    CLOCK = time.perf_counter if args.wall else time.thread_time
    torch.set_num_threads(1)
    rows = run(args.rounds, args.backends)
    env = environment("cpu")
    text = markdown(rows, env).replace("{rounds}", str(args.rounds))
    print(text)
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "host_overhead.json").write_text(json.dumps(dict(environment=env, rows=rows), indent=1) + "\n")
        (args.out / "host_overhead.md").write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())

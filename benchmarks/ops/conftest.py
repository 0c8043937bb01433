"""The harness of the op suite: cases, sizes, timing and what each result records.

    pytest benchmarks/ops --benchmark-only [--benchmark-json=out.json]
    pytest benchmarks/ops --benchmark-only --bench-full          # the ViT sweep (or ACLIP_BENCH_FULL=1)
    pytest benchmarks/ops --benchmark-only --bench-devices=cuda  # one device (or ACLIP_BENCH_DEVICES)

A test module names its op (``OP``), its passes (``PASSES``) and ``methods(device)``; the suite
times every method of a case in one pytest-benchmark group keyed by (op, pass, shape, dtype,
device), one ``benchmark.pedantic`` call per method. Before every timed call the last-level cache
is flushed (``cache_flusher``); on a GPU the clock is ``CudaEventClock`` (CUDA events around the
call, do_bench-style). Each result's ``extra_info`` holds the case, the bytes the op must move and
the bandwidth: GB/s, its share of a copy measured in the same session, and on a known GPU its share
of the data-sheet HBM bandwidth. The JSON's ``machine_info["aclip_kernels"]`` records the environment.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import os
import sys
from pathlib import Path

import pytest
import torch


def _load_harness():
    """This tree's ``aclip_kernels/benchmarking.py``, loaded by path: under ``make bench-compare``
    the installed ``aclip_kernels`` is another commit's build, timed with this tree's harness."""
    spec = importlib.util.spec_from_file_location(
        "_aclip_bench_harness", Path(__file__).resolve().parents[2] / "aclip_kernels" / "benchmarking.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


harness = _load_harness()

# (patch grid side, width) of the ViT shapes; heads = width // 64
SHAPES = {"ViT-B/16@224": (14, 768), "ViT-L/14@224": (16, 1024), "ViT-L/14@336": (24, 1024)}
DEFAULT = {"cpu": dict(shapes=["ViT-B/16@224"], images=[16], dtypes=["fp32"], rounds=5, warmup=1),
           "cuda": dict(shapes=["ViT-B/16@224"], images=[256], dtypes=["bf16", "fp32"], rounds=50, warmup=5)}
FULL = dict(shapes=list(SHAPES), images=[64, 256], dtypes=["fp32", "bf16"])
CLOCK = harness.CudaEventClock()


@dataclasses.dataclass(frozen=True)
class Case:
    """One group: ``images`` images (x2 views for the masks) of ``shape`` in ``dtype`` on ``device``."""
    op: str
    passes: str                  # "fwd" or "fwd+bwd"
    shape: str
    images: int
    dtype: str
    device: str
    views: int = 2

    @property
    def grid(self) -> int:
        return SHAPES[self.shape][0]

    @property
    def width(self) -> int:
        return SHAPES[self.shape][1]

    @property
    def torch_dtype(self) -> torch.dtype:
        return harness.DTYPES[self.dtype]

    @property
    def group(self) -> str:
        return f"{self.op} {self.passes} | {self.shape}, {self.images} images | {self.dtype} | {self.device}"

    def id(self) -> str:
        return f"{self.device}-{self.shape}-b{self.images}-{self.dtype}-{self.passes}"


def pytest_addoption(parser):
    group = parser.getgroup("aclip_kernels op benchmarks")
    group.addoption("--bench-full", action="store_true", default=os.environ.get("ACLIP_BENCH_FULL", "0") == "1",
                    help="the ViT sweep: 3 shapes x 64/256 images x fp32/bf16 (env ACLIP_BENCH_FULL=1)")
    group.addoption("--bench-devices", default=os.environ.get("ACLIP_BENCH_DEVICES", ""),
                    help="comma-separated devices (env ACLIP_BENCH_DEVICES; default: cpu, and cuda when present)")
    group.addoption("--bench-images", default=os.environ.get("ACLIP_BENCH_IMAGES", ""),
                    help="comma-separated image batches, replacing the default's (env ACLIP_BENCH_IMAGES)")
    group.addoption("--bench-rounds", type=int, default=int(os.environ.get("ACLIP_BENCH_ROUNDS", "0")),
                    help="timed rounds per method (default: 5 on the CPU, 50 on a GPU)")


def _devices(config) -> list:
    chosen = [d for d in config.getoption("--bench-devices").split(",") if d]
    unknown = [d for d in chosen if d not in DEFAULT]
    if unknown:
        raise pytest.UsageError(f"--bench-devices={','.join(chosen)}: unknown {unknown}; expected cpu and/or cuda")
    if not chosen:
        return ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    if "cuda" in chosen and not torch.cuda.is_available():
        raise pytest.UsageError("--bench-devices names cuda, but torch sees no CUDA device")
    return chosen


def _positive_ints(option: str, text: str) -> list:
    try:
        return harness.positive_ints(text)
    except ValueError:
        raise pytest.UsageError(f"{option}={text}: expected comma-separated positive integers") from None


def pytest_configure(config):
    """Reject bad options before collection, naming the option and its value."""
    _devices(config)
    if config.getoption("--bench-images"):
        _positive_ints("--bench-images", config.getoption("--bench-images"))
    if config.getoption("--bench-rounds") < 0:
        raise pytest.UsageError(f"--bench-rounds={config.getoption('--bench-rounds')}: expected a positive integer")


def pytest_generate_tests(metafunc):
    if "case" not in metafunc.fixturenames:
        return
    module, config = metafunc.module, metafunc.config
    params = []
    for device in _devices(config):
        sizes = dict(DEFAULT[device], **(FULL if config.getoption("--bench-full") else {}))
        if config.getoption("--bench-images"):
            sizes["images"] = _positive_ints("--bench-images", config.getoption("--bench-images"))
        for passes in module.PASSES:
            for shape in sizes["shapes"]:
                for images in sizes["images"]:
                    for dtype in sizes["dtypes"]:
                        case = Case(module.OP, passes, shape, images, dtype, device)
                        params += [pytest.param(case, method, id=f"{case.id()}-{method}")
                                   for method in module.methods(device)]
    metafunc.parametrize("case,method", params)


def pytest_collection_modifyitems(items):
    for item in items:
        case = getattr(item, "callspec", None) and item.callspec.params.get("case")
        if case is not None and case.device == "cuda":
            item.add_marker(pytest.mark.benchmark(timer=CLOCK))


def pytest_benchmark_update_machine_info(config, machine_info):
    machine_info["aclip_kernels"] = {device: harness.environment(device) for device in _devices(config)}
    if os.environ.get("ACLIP_BENCH_LABEL"):       # make bench-compare: the git ref the library was built from
        machine_info["aclip_kernels_label"] = os.environ["ACLIP_BENCH_LABEL"]


_SESSION = {}       # per device: the cache flusher and the copy rate measured once


def _device_state(device: str) -> dict:
    if device not in _SESSION:
        _SESSION[device] = {"flush": harness.cache_flusher(device), "copy_gbps": harness.copy_gbps(device)}
    return _SESSION[device]


@pytest.fixture
def measure(benchmark, request):
    """``measure(fn, case, bytes_moved)``: time the no-argument ``fn`` as one pedantic benchmark of
    ``case``'s group (cache flushed before each call) and record the case and its bandwidth."""
    rounds_option = request.config.getoption("--bench-rounds")

    def run(fn, case: Case, bytes_moved: int):
        state, sizes = _device_state(case.device), DEFAULT[case.device]
        benchmark.group = case.group
        benchmark.extra_info.update(op=case.op, passes=case.passes, shape=case.shape, images=case.images,
                                    views=case.views, dtype=case.dtype, device=case.device,
                                    timer="cuda events" if case.device == "cuda" else "perf_counter",
                                    cache_flushed=True)
        benchmark.pedantic(fn, setup=state["flush"], rounds=rounds_option or sizes["rounds"],
                           warmup_rounds=sizes["warmup"], iterations=1)
        if benchmark.stats is not None:           # None under --benchmark-disable
            benchmark.extra_info.update(harness.bandwidth(bytes_moved, benchmark.stats.stats.median, case.device,
                                                          state["copy_gbps"]))
    return run


_INPUTS = {}


@pytest.fixture
def inputs(case):
    """The inputs of ``case``, built once by the module's ``make_inputs(case)`` and shared by its
    methods (only the latest case is kept, so a sweep holds one case's tensors at a time)."""
    def get(make):
        key = (make.__module__, case)
        if key not in _INPUTS:
            _INPUTS.clear()
            _INPUTS[key] = make(case)
        return _INPUTS[key]
    return get

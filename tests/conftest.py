"""Session setup and the native test builds.

Without a GPU, Triton kernels can only run in the interpreter, and triton.jit reads TRITON_INTERPRET
when a kernel module is imported (``import aclip_kernels`` imports them): this is the one place that
sets it, before anything imports aclip_kernels, whatever the collection order.

The native test builds compile csrc/ again with g++ under their own op namespaces, so that they load
next to the installed ``aclip_kernels._C``: the CUDA kernels under the emulated CUDA execution model
of tests/cuda_emulation (``aclip_kernels_emu``, CPU tensors), and the C++ CPU kernels
(``aclip_kernels_native``). With ACLIP_ASAN=1 (set by the AddressSanitizer runs, which preload the
sanitizer runtime) both are built with -fsanitize=address.
"""
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Tuple

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from aclip_kernels.backends import BACKENDS, resolve_backend  # noqa: E402  (imports the Triton kernels)
from aclip_kernels.ops._define import define_schemas  # noqa: E402
from aclip_kernels.testing import child_environment  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CSRC = ROOT / "csrc"
EMULATION = ROOT / "tests" / "cuda_emulation"
CUDA_INCLUDE = Path(os.environ.get("CUDA_HOME", "/usr/local/cuda")) / "include"
CXX = os.environ.get("CXX", "c++")
ASAN = os.environ.get("ACLIP_ASAN") == "1"

_LAUNCH = (r"(\w+)<<<(.*?)>>>\(", r"::emu::launch(\1, ::emu::Config(\2), ")
_SHARED = (r"extern __shared__ (?:__align__\((\d+)\) )?(\w[\w ]*?) (\w+)\[\];",
           lambda m: f"{m[2]}* {m[3]} = ::emu::dynamic_shared<{m[2]}, {m[1] or 16}>();")


def _namespace(ns: str, dispatch_key: str = "CPU") -> Tuple[str, str]:
    return rf"TORCH_LIBRARY_IMPL\(aclip_kernels, {dispatch_key},", f"TORCH_LIBRARY_IMPL({ns}, CPU,"


# name: {source: [(pattern, replacement), ...]}, each pattern must match; sources without rewrites: []
_BUILDS: Dict[str, Dict[str, list]] = {
    "aclip_kernels_emu": {
        "cuda/attentive_mask.cu": [_LAUNCH, _SHARED],
        "cuda/cls_attention.cu": [_LAUNCH, _SHARED],
        "cuda/ops_cuda.cpp": [(r"at::kCUDA\b", "at::kCPU"), _namespace("aclip_kernels_emu", "CUDA")],
    },
    "aclip_kernels_native": {
        "cpu/attentive_mask.cpp": [_namespace("aclip_kernels_native")],
        "cpu/cls_attention.cpp": [_namespace("aclip_kernels_native")],
    },
}


@dataclass(frozen=True)
class NativeOps:
    """A native test build: ``ops`` its op namespace (torch.ops.<name>), ``library`` the shared
    object, for a child process to load with torch.ops.load_library."""
    name: str
    library: Path

    @property
    def ops(self):
        return getattr(torch.ops, self.name)


def _sources(name: str) -> List[str]:
    """Copies of the sources, rewritten, under build/<name>/src (written only when they change, so
    that ninja reuses the objects)."""
    sources = []
    for source, rewrites in _BUILDS[name].items():
        path = CSRC / source
        text = path.read_text()
        for pattern, replacement in rewrites:
            text, found = re.subn(pattern, replacement, text)
            assert found, f"{path} no longer matches {pattern!r}; update tests/conftest.py"
        prelude = '#include "cuda_emulation.h"\n' if source.endswith(".cu") else ""
        text = f'{prelude}#line 1 "{path}"\n{text}'
        out = ROOT / "build" / name / "src" / Path(source).with_suffix(".cpp")
        if not out.exists() or out.read_text() != text:  # atomically: test processes may build at once
            out.parent.mkdir(parents=True, exist_ok=True)
            partial = out.with_name(f"{out.name}.{os.getpid()}")
            partial.write_text(text)
            os.replace(partial, out)
        sources.append(str(out))
    return sources


def build_native(name: str) -> NativeOps:
    """Builds (or reuses) and loads the native test build ``name``; skips where it cannot be built."""
    from torch.utils import cpp_extension
    if shutil.which(CXX) is None or not cpp_extension.is_ninja_available():
        pytest.skip("needs a C++ compiler and ninja")
    includes = [str(CSRC), str(CSRC / "cpu"), str(CSRC / "cuda")]
    if name == "aclip_kernels_emu":
        if not (CUDA_INCLUDE / "cuda_fp16.h").exists():
            pytest.skip(f"needs the CUDA headers ({CUDA_INCLUDE})")
        includes = [str(EMULATION / "include"), str(EMULATION)] + includes + [str(CUDA_INCLUDE)]
    build = ROOT / "build" / name / f"torch-{torch.__version__}{'-asan' if ASAN else ''}"
    build.mkdir(parents=True, exist_ok=True)
    sanitize = ["-fsanitize=address", "-fno-omit-frame-pointer", "-g"] if ASAN else []
    cpp_extension.load(name=name, sources=_sources(name), build_directory=str(build), is_python_module=False,
                       extra_cflags=["-O2", "-ffp-contract=off"] + sanitize, extra_ldflags=sanitize,
                       extra_include_paths=includes)
    define_schemas(name)
    return NativeOps(name, build / f"{name}.so")


@dataclass(frozen=True)
class OpBackend:
    """A backend of the ops and the device its tensors live on; ``interpreted``: Triton on the CPU."""
    name: str
    device: str

    @property
    def interpreted(self) -> bool:
        return self.name == "triton" and self.device == "cpu"


@pytest.fixture(params=BACKENDS)
def op_backend(request) -> OpBackend:
    """Every backend of the ops (torch, cpu, cuda, triton), on its device; skipped where it cannot run."""
    name = request.param
    device = "cuda" if name == "cuda" or (name == "triton" and torch.cuda.is_available()) else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    try:
        resolve_backend(name, torch.device(device))
    except RuntimeError as error:
        pytest.skip(str(error))
    return OpBackend(name, device)


@pytest.fixture(scope="session")
def emulated_cuda():
    """The CUDA kernels of csrc/cuda on the CPU (``aclip_kernels_emu``), built on first use."""
    return build_native("aclip_kernels_emu")


@pytest.fixture(scope="session")
def native_cpu():
    """The C++ CPU kernels built again as ``aclip_kernels_native`` (with ASan in the ASan runs)."""
    return build_native("aclip_kernels_native")


@pytest.fixture(scope="session")
def run_under_asan():
    """``run(*test_files)``: pytest on the files in a child process whose native test builds are
    built with -fsanitize=address, asserting that it passes (no out-of-bounds access to any tensor).
    The child preloads the sanitizer runtime, and libstdc++ so that it can intercept C++ throws
    (TORCH_CHECK); it runs with -s so that a sanitizer report reaches its stderr."""
    runtimes = [subprocess.run([CXX, f"-print-file-name={lib}"], capture_output=True, text=True).stdout.strip()
                for lib in ("libasan.so", "libstdc++.so")]
    if not all(os.path.isabs(path) for path in runtimes):
        pytest.skip(f"{CXX} has no AddressSanitizer runtime")
    env = dict(child_environment(), LD_PRELOAD=" ".join(runtimes), ASAN_OPTIONS="detect_leaks=0", ACLIP_ASAN="1")

    def run(*test_files) -> None:
        child = subprocess.run([sys.executable, "-m", "pytest", "-q", "-s", "-p", "no:cacheprovider",
                                *map(str, test_files)], cwd=ROOT, env=env, capture_output=True, text=True)
        assert child.returncode == 0, child.stdout[-4000:] + child.stderr[-5000:]
        assert " passed" in child.stdout.splitlines()[-1], child.stdout[-2000:]
    return run



@pytest.fixture(scope="session")
def far_apart():
    """``far_apart(t)``: t's values in a view whose entries along dim 0 start 2**31 + 64 elements
    apart, so that element and byte offsets pass 2**31 (int32 index products would wrap). The
    storage is reserved, not written: only the pages of t's values are touched."""
    gap = 2 ** 31 + 64

    def make(t: torch.Tensor) -> torch.Tensor:
        storage = torch.empty(gap * (t.shape[0] - 1) + t[0].numel(), dtype=t.dtype)
        return storage.as_strided(t.shape, (gap,) + t[0].contiguous().stride()).copy_(t)
    return make


@pytest.fixture
def far_apart_inputs(far_apart):
    """attentive_mask inputs (fused q/k scoring, float16) whose x and k have their two images
    2**31 + 64 elements apart (4 GiB of storage each, reserved, not written)."""
    g = torch.Generator().manual_seed(0)
    return dict(x=far_apart(torch.randn(2, 1 + 16, 24, generator=g).half()),
                q=torch.randn(2, 3, 8, generator=g).half(),
                k=far_apart(torch.randn(2, 3, 1 + 16, 8, generator=g).half()), keep=0.5, block=2)

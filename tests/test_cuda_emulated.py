"""The CUDA kernels of csrc/cuda on the CPU: their exact source, host launchers and the op glue of
ops_cuda.cpp, compiled with g++ against the emulated CUDA execution model of tests/cuda_emulation
(fiber threads, block barriers, warp shuffles, shared memory) as the ops ``aclip_kernels_emu::*``
for CPU tensors, against the reference: the parity grid and the layouts of test_cuda.py forward
and backward (exact), cls_attention (within tolerance); and all of it again under AddressSanitizer."""
import importlib.util
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from aclip_kernels.ops._checks import check_mask_args
from aclip_kernels.ops.attentive_mask import op_arguments
from aclip_kernels.reference import cls_attention_ref, scatter_tokens_ref
from aclip_kernels.testing import (CLS_ATTENTION_TOL, assert_cls_attention_close, assert_mask_matches_reference,
                                   cls_attention_inputs, make_mask_inputs, mask_cases)

ROOT = Path(__file__).resolve().parents[1]
CSRC = ROOT / "csrc"
EMULATION = ROOT / "tests" / "cuda_emulation"
BUILD = ROOT / "build" / "cuda_emulation"  # src/: the rewritten sources; torch-<version>[-asan]/: the builds
CUDA_INCLUDE = Path(os.environ.get("CUDA_HOME", "/usr/local/cuda")) / "include"
CXX = os.environ.get("CXX", "c++")
ASAN = os.environ.get("ACLIP_EMULATION_ASAN") == "1"  # set by test_no_memory_errors_under_asan for its run

_spec = importlib.util.spec_from_file_location("test_cuda_cases", Path(__file__).with_name("test_cuda.py"))
test_cuda = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(test_cuda)
LAYOUTS = [name for name, _ in test_cuda.layout_cases("cpu")]


LAUNCH = (r"(\w+)<<<(.*?)>>>\(", r"::emu::launch(\1, ::emu::Config(\2), ")
SHARED = (r"extern __shared__ (?:__align__\((\d+)\) )?(\w[\w ]*?) (\w+)\[\];",
          lambda m: f"{m[2]}* {m[3]} = ::emu::dynamic_shared<{m[2]}, {m[1] or 16}>();")
REWRITES = {  # source: (pattern, replacement), each of which must match
    "cuda/attentive_mask.cu": [LAUNCH, SHARED],
    "cuda/cls_attention.cu": [LAUNCH, SHARED],
    "cuda/ops_cuda.cpp": [(r"\.is_cuda\(\)", ".is_cpu()"),
                          (r"TORCH_LIBRARY_IMPL\(aclip_kernels, CUDA,", "TORCH_LIBRARY_IMPL(aclip_kernels_emu, CPU,")],
    "ops.cpp": [(r"TORCH_LIBRARY\(aclip_kernels,", "TORCH_LIBRARY(aclip_kernels_emu,")],
}


def _emulated_sources() -> list:
    """Copies of the sources as g++ can compile them, under build/cuda_emulation/src (rewritten
    only when they change, so that ninja reuses the objects): kernel launches and dynamic shared
    memory become emulation calls; the op glue takes CPU tensors and registers as aclip_kernels_emu."""
    sources = []
    for name, rewrites in REWRITES.items():
        path = CSRC / name
        text = path.read_text()
        for pattern, replacement in rewrites:
            text, found = re.subn(pattern, replacement, text)
            assert found, f"{path} no longer matches {pattern!r}; update the emulation"
        prelude = '#include "cuda_emulation.h"\n' if name.endswith(".cu") else ""
        text = f'{prelude}#line 1 "{path}"\n{text}'
        out = BUILD / "src" / Path(name).with_suffix(".cpp")
        if not out.exists() or out.read_text() != text:
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(text)
        sources.append(str(out))
    return sources


@pytest.fixture(scope="module")
def ops():
    """The emulated CUDA ops, built on first use under build/cuda_emulation, then reused."""
    from torch.utils import cpp_extension
    if shutil.which(CXX) is None or not cpp_extension.is_ninja_available():
        pytest.skip("needs a C++ compiler and ninja")
    if not (CUDA_INCLUDE / "cuda_fp16.h").exists():
        pytest.skip(f"needs the CUDA headers ({CUDA_INCLUDE})")
    build = BUILD / f"torch-{torch.__version__}{'-asan' if ASAN else ''}"
    build.mkdir(parents=True, exist_ok=True)
    sanitize = ["-fsanitize=address", "-fno-omit-frame-pointer", "-g"] if ASAN else []
    cpp_extension.load(
        name="aclip_kernels_emu", sources=_emulated_sources(), build_directory=str(build), is_python_module=False,
        extra_cflags=["-O2", "-ffp-contract=off"] + sanitize, extra_ldflags=sanitize,
        extra_include_paths=[str(EMULATION / "include"), str(EMULATION), str(CSRC), str(CSRC / "cuda"),
                             str(CUDA_INCLUDE)])
    return torch.ops.aclip_kernels_emu


def emulated_mask(ops, x, scores=None, keep=0.5, *, q=None, k=None, prior=None, num_prefix_tokens=1, grid=None,
                  block=1, boxes=None, scale=None):
    """ak.attentive_mask's call of the compiled op, made to the emulated one."""
    args = check_mask_args(x, scores, keep, q, k, prior, num_prefix_tokens, grid, block, boxes, scale)
    return ops.attentive_mask(*op_arguments(args))


def check_backward(ops, inputs, grad_layout="contiguous"):
    kept, idx = emulated_mask(ops, **inputs)
    p = inputs.get("num_prefix_tokens", 1)
    n = inputs["x"].shape[1] - p
    if grad_layout == "strided":
        grad = torch.randn(*kept.shape[:2], kept.shape[2] + 3, dtype=kept.dtype)[..., 1:-2]
    elif grad_layout == "expanded":
        grad = torch.randn(1, 1, kept.shape[2], dtype=kept.dtype).expand(kept.shape)
    else:
        grad = torch.randn_like(kept)
    grad_x = ops.attentive_mask_backward(grad, idx, p, n)
    torch.testing.assert_close(grad_x, scatter_tokens_ref(grad, idx, p, n), rtol=0, atol=0)


@pytest.mark.parametrize("case", mask_cases(), ids=lambda c: c.id)
def test_attentive_mask_matches_reference(ops, case):
    inputs = make_mask_inputs(case)
    kept, idx = emulated_mask(ops, **inputs)
    assert_mask_matches_reference(kept, idx, inputs)


@pytest.mark.parametrize("name", LAYOUTS)
def test_attentive_mask_layouts(ops, name):
    """Narrow copy units (odd widths, offsets, strides), the bitonic sort (24x24 and 32x32 grids of
    single patches) and several blocks per row (small batches)."""
    inputs = dict(test_cuda.layout_cases("cpu"))[name]
    kept, idx = emulated_mask(ops, **inputs)
    assert_mask_matches_reference(kept, idx, inputs)


@pytest.mark.parametrize("case", mask_cases(), ids=lambda c: c.id)
def test_backward_matches_reference(ops, case):
    check_backward(ops, make_mask_inputs(case))


@pytest.mark.parametrize("grad_layout", ["contiguous", "strided", "expanded"])
@pytest.mark.parametrize("name", ["width42-bfloat16", "width3-float16", "storage-offset", "vitl14-448-p8",
                                  "rect-32x64-b4-boxes"])
def test_backward_layouts(ops, name, grad_layout):
    check_backward(ops, dict(test_cuda.layout_cases("cpu"))[name], grad_layout)


def test_backward_skips_out_of_range_indices(ops):
    grad_x = ops.attentive_mask_backward(torch.ones(2, 3, 8), torch.tensor([[-1, 70], [3, 64]]), 1, 64)
    assert grad_x[:, 1:].abs().sum(-1).nonzero().tolist() == [[1, 3]]


def test_shared_memory_limit_is_checked_on_the_host(ops):
    """A 160x160 grid of single patches needs 256 KiB of sort keys, more than the device's 227 KiB."""
    x, scores = torch.randn(1, 1 + 160 * 160, 1), torch.randn(1, 160, 160)
    with pytest.raises(RuntimeError, match="shared memory per block"):
        emulated_mask(ops, x, scores, keep=10)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("prefix", [0, 1, 5])
@pytest.mark.parametrize("strided", [False, True])
@pytest.mark.parametrize("shape", [(3, 4, 49, 16), (2, 3, 9, 1), (2, 2, 300, 80), (1, 4, 4096, 16)],
                         ids=["small", "dh1", "dh80", "long"])
def test_cls_attention_matches_reference(ops, dtype, prefix, strided, shape):
    """Shape "long" needs 64 KiB of shared memory (more than the default 48) and two chunks of heads."""
    b, h, n, dh = shape
    q, k = cls_attention_inputs(b, h, prefix + n, dh, dtype, strided=strided)
    assert_cls_attention_close(ops.cls_attention(q, k, prefix, dh ** -0.5, None), q, k, prefix)


def test_cls_attention_adds_prior(ops):
    q, k = cls_attention_inputs(4, 12, 197, 64, torch.bfloat16, strided=True)
    prior = torch.rand(4, 196)
    rtol, atol = CLS_ATTENTION_TOL[torch.bfloat16]
    torch.testing.assert_close(ops.cls_attention(q, k, 1, 0.125, prior), prior + cls_attention_ref(q, k, 1),
                               rtol=rtol, atol=atol)


@pytest.mark.skipif(ASAN, reason="this is the AddressSanitizer run")
def test_no_memory_errors_under_asan(ops):
    """Every other test of this file in a child process with the extension built with
    -fsanitize=address: no out-of-bounds access to any tensor. The child preloads the sanitizer
    runtime, and libstdc++ so that it can intercept C++ throws (TORCH_CHECK); it runs with -s so
    that a sanitizer report reaches its stderr."""
    runtimes = [subprocess.run([CXX, f"-print-file-name={lib}"], capture_output=True, text=True).stdout.strip()
                for lib in ("libasan.so", "libstdc++.so")]
    if not all(os.path.isabs(path) for path in runtimes):
        pytest.skip(f"{CXX} has no AddressSanitizer runtime")
    env = dict(os.environ, LD_PRELOAD=" ".join(runtimes), ASAN_OPTIONS="detect_leaks=0", ACLIP_EMULATION_ASAN="1")
    run = subprocess.run([sys.executable, "-m", "pytest", "-v", "-s", "-p", "no:cacheprovider", __file__], cwd=ROOT,
                         env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-5000:]

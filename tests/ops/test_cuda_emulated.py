"""The CUDA kernels of csrc/cuda on the CPU: their exact source, host launchers and the op glue of
ops_cuda.cpp, compiled with g++ against the emulated CUDA execution model of tests/cuda_emulation
(fiber threads, block barriers, warp shuffles, shared memory) as the ops ``aclip_kernels_emu::*``
for CPU tensors, against the reference: the parity grid and the layouts of test_cuda.py forward
and backward (exact), cls_attention (within tolerance); and all of it again under AddressSanitizer."""
import importlib.util
import os
from pathlib import Path

import pytest
import torch

from aclip_kernels.ops._checks import check_mask_args
from aclip_kernels.ops.attentive_mask import op_arguments
from aclip_kernels.reference import cls_attention_ref, scatter_tokens_ref
from aclip_kernels.testing import (CLS_ATTENTION_TOL, assert_cls_attention_close, assert_mask_matches_reference,
                                   cls_attention_inputs, make_mask_inputs, mask_cases)

ASAN = os.environ.get("ACLIP_ASAN") == "1"  # set by run_under_asan (tests/conftest.py) for its child process

_spec = importlib.util.spec_from_file_location("test_cuda_cases", Path(__file__).with_name("test_cuda.py"))
test_cuda = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(test_cuda)
LAYOUTS = [name for name, _ in test_cuda.layout_cases("cpu")]


@pytest.fixture(scope="module")
def ops(emulated_cuda):
    """The emulated CUDA ops (tests/conftest.py builds them on first use, then reuses them)."""
    return emulated_cuda.ops


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


def test_backward_rejects_out_of_range_indices(ops):
    with pytest.raises(ValueError, match="ascend strictly inside"):
        ops.attentive_mask_backward(torch.ones(2, 3, 8), torch.tensor([[-1, 70], [3, 64]]), 1, 64)


def test_shared_memory_limit_is_checked_on_the_host(ops):
    """A 160x160 grid of single patches needs 256 KiB of sort keys, more than the device's 227 KiB."""
    x, scores = torch.randn(1, 1 + 160 * 160, 1), torch.randn(1, 160, 160)
    with pytest.raises(RuntimeError, match="shared memory per block"):
        emulated_mask(ops, x, scores, keep=10)


def test_rows_of_2_gib_are_rejected_on_the_host(ops):
    """The kernels copy a row with int32 byte indices: a row of 2**31 bytes (4 GiB of x, reserved,
    not written) is a ValueError naming x before any kernel runs."""
    x = torch.empty(1, 2, 2 ** 30, dtype=torch.float16)
    with pytest.raises(ValueError, match="rows of x"):
        emulated_mask(ops, x, torch.rand(1, 1, 1), keep=1)
    with pytest.raises(ValueError, match="rows of grad_kept"):
        ops.attentive_mask_backward(x, torch.zeros(1, 1, dtype=torch.long), 1, 1)


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


@pytest.mark.parametrize("layout", ["one-vector-per-key", "offset-by-one", "head-dim-12", "last-dim-stride2"])
def test_cls_attention_vector_and_element_loads(ops, layout):
    """Key rows read as 16-byte vectors (one per key: Dh=8 bfloat16) and element by element when a
    row start is misaligned, Dh * itemsize is no multiple of 16, or the head dim is strided."""
    q, k = cls_attention_inputs(2, 3, 21, 12 if layout == "head-dim-12" else 8, torch.bfloat16)
    if layout == "offset-by-one":
        k = torch.cat([k.new_zeros(1), k.flatten()])[1:].view(k.shape)
    elif layout == "last-dim-stride2":
        k = torch.stack([k, torch.zeros_like(k)], dim=-1)[..., 0]
    assert_cls_attention_close(ops.cls_attention(q, k, 1, q.shape[-1] ** -0.5, None), q, k, 1)


def test_cls_attention_adds_prior(ops):
    q, k = cls_attention_inputs(4, 12, 197, 64, torch.bfloat16, strided=True)
    prior = torch.rand(4, 196)
    rtol, atol = CLS_ATTENTION_TOL[torch.bfloat16]
    torch.testing.assert_close(ops.cls_attention(q, k, 1, 0.125, prior), prior + cls_attention_ref(q, k, 1),
                               rtol=rtol, atol=atol)


def test_offsets_past_int32(ops, far_apart, far_apart_inputs):
    """Every offset product must be int64: the images of x, k and grad_kept are 2**31 + 64 elements apart."""
    inputs = far_apart_inputs
    kept, idx = emulated_mask(ops, **inputs)
    assert_mask_matches_reference(kept, idx, inputs)
    q, k = inputs["q"], inputs["k"]
    assert_cls_attention_close(ops.cls_attention(q, k, 1, 8 ** -0.5, None), q, k, 1)
    grad_x = ops.attentive_mask_backward(far_apart(kept), idx, 1, 16)
    torch.testing.assert_close(grad_x, scatter_tokens_ref(kept, idx, 1, 16), rtol=0, atol=0)


@pytest.mark.skipif(ASAN, reason="this is the AddressSanitizer run")
def test_no_memory_errors_under_asan(run_under_asan):
    """Every other test of this file with the emulated kernels built with -fsanitize=address."""
    run_under_asan(__file__)

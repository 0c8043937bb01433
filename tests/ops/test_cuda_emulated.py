"""The CUDA kernels of csrc/cuda on the CPU: their exact source, host launchers and the op glue of
ops_cuda.cpp, compiled with g++ against the emulated CUDA execution model of tests/cuda_emulation
(fiber threads, block barriers, warp shuffles, shared memory) as the ops ``aclip_kernels_emu::*``
for CPU tensors, against the reference: the parity grid and the layouts of test_cuda.py forward
and backward (exact), cls_attention (within tolerance) unsplit and split over head groups on
emulated devices of several SM counts; and all of it again under AddressSanitizer."""
import contextlib
import ctypes
import importlib.util
import math
import os
from pathlib import Path

import pytest
import torch

from aclip_kernels.ops._checks import check_mask_args
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


class EmulatedDevice:
    """The emulated device's SM count and launch log (cuda_emulation.h's emu_* functions)."""

    def __init__(self, library):
        self._lib = ctypes.CDLL(str(library))
        self._lib.emu_set_multiprocessors.argtypes = [ctypes.c_int]
        self._lib.emu_take_launches.argtypes = [ctypes.POINTER(ctypes.c_uint), ctypes.c_int]

    @contextlib.contextmanager
    def multiprocessors(self, count: int):
        previous = self._lib.emu_set_multiprocessors(count)
        try:
            yield
        finally:
            self._lib.emu_set_multiprocessors(previous)

    def take_launches(self, capacity: int = 64):
        """(grid x, grid y, threads per block) of each launch since the last call (the first
        `capacity` of them)."""
        records = (ctypes.c_uint * (5 * capacity))()
        n = min(capacity, self._lib.emu_take_launches(records, capacity))
        return [(records[5 * i], records[5 * i + 1], records[5 * i + 3]) for i in range(n)]


@pytest.fixture(scope="module")
def device(emulated_cuda):
    return EmulatedDevice(emulated_cuda.library)


def expected_groups(batch, heads, sms):
    """cls_attention.cu's split_groups: the most head groups with B * G <= 2 * SMs, in [1, H]."""
    return max(1, min(heads, 2 * sms // batch))


def cls_attention_launches(batch, heads, n, sms):
    """The launches of cls_attention on `sms` SMs: a (B, G) grid of 512-thread blocks, then for G > 1
    the kernel that adds the G partial sums of the B * N scores."""
    groups = expected_groups(batch, heads, sms)
    combine = [(math.ceil(batch * n / 256), 1, 256)] if groups > 1 else []
    return [(batch, groups, 512)] + combine


def run_cls_attention(ops, device, q, k, prefix, prior=None, sms=132):
    """The emulated op on a device of `sms` SMs, asserting the grids it launched."""
    b, h, t = k.shape[:3]
    device.take_launches()
    with device.multiprocessors(sms):
        out = ops.cls_attention(q, k, prefix, q.shape[-1] ** -0.5, prior)
    assert device.take_launches() == cls_attention_launches(b, h, t - prefix, sms)
    return out


def sequence_first(q, k):
    """q and k as views of a sequence-first packed qkv ([T, B, 3, H, Dh], open_clip's layout):
    q the first token's query."""
    t, (b, h, dh) = k.shape[2], q.shape
    qkv = torch.zeros(t, b, 3, h, dh, dtype=q.dtype)
    qkv[:, :, 1] = k.permute(2, 0, 1, 3)
    qkv[0, :, 0] = q
    return qkv[0, :, 0], qkv[:, :, 1].permute(1, 2, 0, 3)


def emulated_mask(ops, x, scores=None, keep=0.5, *, q=None, k=None, prior=None, num_prefix_tokens=1, grid=None,
                  block=1, boxes=None, scale=None):
    """ak.attentive_mask's call of the compiled op, made to the emulated one."""
    args = check_mask_args(x, scores, keep, q, k, prior, num_prefix_tokens, grid, block, boxes, scale)
    return ops.attentive_mask(*args)


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


DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]


CLS_SHAPES = {"small": (3, 4, 49, 16), "dh1": (2, 3, 9, 1), "dh80": (2, 2, 300, 80), "long": (1, 4, 4096, 16)}
# The whole grid unsplit; split, every shape and layout in fp32 and bf16 with one prefix token (the
# split path differs only in its head range and the combine, which see no dtype or prefix of their own).
CLS_CASES = [pytest.param(dtype, prefix, strided, shape, sms, id=f"{split}-{name}-{strided}-{prefix}-{str(dtype)[6:]}")
             for split, sms in (("unsplit", 0), ("split", 132))
             for name, shape in CLS_SHAPES.items()
             for strided in (False, True)
             for prefix in ((0, 1, 5) if not sms else (1,))
             for dtype in (DTYPES if not sms else (torch.float32, torch.bfloat16))]


@pytest.mark.parametrize("dtype,prefix,strided,shape,sms", CLS_CASES)
def test_cls_attention_matches_reference(ops, device, dtype, prefix, strided, shape, sms):
    """On 132 SMs each shape splits into one group per head (G = H); unsplit, shape "long" needs
    64 KiB of shared memory (more than the default 48) and two chunks of heads."""
    b, h, n, dh = shape
    q, k = cls_attention_inputs(b, h, prefix + n, dh, dtype, strided=strided)
    assert_cls_attention_close(run_cls_attention(ops, device, q, k, prefix, sms=sms), q, k, prefix)


# name: (B, H, SMs); the comment gives G = expected_groups(B, H, SMs) and the heads per group
SPLITS = {
    "h5-in-3-groups": (2, 5, 3),      # G=3: 1, 2, 2 heads
    "h7-in-2-groups": (3, 7, 3),      # G=2: 3, 4
    "h40-2-chunks-each": (1, 40, 1),  # G=2: 20, 20 heads, each a chunk of 16 and one of 4
    "h1": (2, 1, 132),                # G=1: one head cannot split
    "b8-h12": (8, 12, 132),           # G=12: ViT-B's heads at an eval batch on an H200
    "b5-2sms": (5, 4, 2),             # G=1: B > 2 * SMs / 2
}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", SPLITS)
def test_cls_attention_head_groups(ops, device, case, dtype):
    b, h, sms = SPLITS[case]
    q, k = cls_attention_inputs(b, h, 1 + 24, 16, dtype, strided=True)
    assert_cls_attention_close(run_cls_attention(ops, device, q, k, 1, sms=sms), q, k, 1)


@pytest.mark.parametrize("layout", ["contiguous", "packed", "sequence-first"])
@pytest.mark.parametrize("prefix", [0, 1])
@pytest.mark.parametrize("sms", [0, 3], ids=["unsplit", "split"])
def test_cls_attention_layouts_and_prior(ops, device, layout, prefix, sms):
    """Strided q and k (a packed qkv, batch- or sequence-first) and a prior, unsplit and in 3 groups of
    heads (H=5 on a device of 3 SMs)."""
    q, k = cls_attention_inputs(2, 5, prefix + 30, 8, torch.float16, strided=layout == "packed")
    if layout == "sequence-first":
        q, k = sequence_first(q, k)
        assert not q.is_contiguous() and k.stride(2) > k.stride(0)
    prior = torch.rand(2, 30, dtype=torch.float64)
    rtol, atol = CLS_ATTENTION_TOL[torch.float16]
    torch.testing.assert_close(run_cls_attention(ops, device, q, k, prefix, prior, sms),
                               prior.float() + cls_attention_ref(q, k, prefix), rtol=rtol, atol=atol)


@pytest.mark.parametrize("name", ["fused-qk", "fused-qk-prior", "fused-qk-bf16"])
def test_fused_attentive_mask_through_head_groups(ops, device, name):
    """attentive_mask scoring from q and k runs cls_attention's split path (B=2, H=4: G=4) first."""
    inputs = make_mask_inputs(next(c for c in mask_cases() if c.name == name))
    b, h, t = inputs["k"].shape[:3]
    n = t - inputs["num_prefix_tokens"]
    assert expected_groups(b, h, 132) > 1
    device.take_launches()
    kept, idx = emulated_mask(ops, **inputs)
    launches = device.take_launches()
    assert launches[:2] == cls_attention_launches(b, h, n, 132)
    assert_mask_matches_reference(kept, idx, inputs)


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

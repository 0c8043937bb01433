"""Hypothesis fuzz of valid inputs: every backend that runs here against the reference.

Shapes (batch, views, prefix, odd and non-square grids, blocks 1-3, widths 0-12), dtypes, layouts
of x (strided, permuted, expanded), scores (ties, NaN, +-inf, a coarse grid of their own, fused
q/k with and without prior, all-equal fused scores) and boxes (inside the image, outside it,
empty or reversed). Forward: exact idx and rows; backward: exact; fused scores' cls_attention
within CLS_ATTENTION_TOL. Backends: ``cpu`` and ``triton`` (interpreter) through the public API;
the emulated CUDA build through its schema op. With ACLIP_ASAN=1 the C++ CPU and emulated CUDA
kernels run as AddressSanitizer builds (test_bad_input.test_no_memory_errors_under_asan).
"""
from __future__ import annotations

import os

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import aclip_kernels as ak
from aclip_kernels.ops._checks import check_mask_args
from aclip_kernels.reference import scatter_tokens_ref
from aclip_kernels.testing import assert_cls_attention_close, assert_mask_matches_reference

ASAN = os.environ.get("ACLIP_ASAN") == "1"
DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]


def _x(draw, g, rows: int, tokens: int, width: int, dtype):
    layout = draw(st.sampled_from(["contiguous", "strided", "permuted", "expanded"]))
    if layout == "strided":
        return torch.randn(2 * rows, tokens, width + 3, generator=g).to(dtype)[::2, :, 1:1 + width]
    if layout == "permuted":
        return torch.randn(width, tokens, rows, generator=g).to(dtype).permute(2, 1, 0)
    if layout == "expanded":
        return torch.randn(1, tokens, width, generator=g).to(dtype).expand(rows, tokens, width)
    return torch.randn(rows, tokens, width, generator=g).to(dtype)


def _scores(draw, g, images: int, grid):
    kind = draw(st.sampled_from(["randn", "ties", "nan", "inf"]))
    if kind == "ties":
        return torch.randint(0, 3, (images, *grid), generator=g).float()
    scores = torch.randn(images, *grid, generator=g)
    if kind == "nan":
        scores[torch.rand(scores.shape, generator=g) < 0.3] = float("nan")
    if kind == "inf":
        scores[torch.rand(scores.shape, generator=g) < 0.3] = float("inf")
        scores[torch.rand(scores.shape, generator=g) < 0.2] = -float("inf")
    return scores


def _boxes(draw, g, rows: int):
    kind = draw(st.sampled_from(["none", "inside", "wild"]))
    if kind == "none":
        return None
    if kind == "inside":
        size = 0.2 + 0.8 * torch.rand(rows, 2, generator=g)
        return torch.cat([(1 - size) * torch.rand(rows, 2, generator=g), size], dim=1)
    return 4 * torch.rand(rows, 4, generator=g) - 2   # outside the image, empty or reversed boxes


@st.composite
def mask_problems(draw):
    """The keyword arguments of a valid ``attentive_mask`` call."""
    g = torch.Generator().manual_seed(draw(st.integers(0, 2 ** 31 - 1)))
    block = draw(st.sampled_from([1, 2, 3]))
    source = draw(st.sampled_from(["scores", "coarse", "qk", "qk_prior", "qk_equal"]))
    hu = draw(st.integers(1, 4))
    wu = hu if source.startswith("qk") else draw(st.integers(1, 4))
    grid = (hu * block, wu * block)
    images, views, prefix = draw(st.integers(1, 3)), draw(st.integers(1, 2)), draw(st.integers(0, 3))
    dtype = draw(st.sampled_from(DTYPES))
    rows = images * views
    kwargs = dict(x=_x(draw, g, rows, prefix + grid[0] * grid[1], draw(st.integers(0, 12)), dtype),
                  num_prefix_tokens=prefix, grid=grid, block=block, boxes=_boxes(draw, g, rows))
    if source == "scores":
        kwargs["scores"] = _scores(draw, g, images, grid)
    elif source == "coarse":
        kwargs["scores"] = _scores(draw, g, images, (draw(st.integers(1, 7)), draw(st.integers(1, 7))))
    else:
        side, heads, dh = draw(st.integers(1, 5)), draw(st.integers(1, 3)), draw(st.integers(1, 9))
        k_dtype = draw(st.sampled_from(DTYPES))
        q = torch.randn(images, heads, dh, generator=g).to(k_dtype)
        kwargs["q"] = torch.zeros_like(q) if source == "qk_equal" else q   # every patch ties
        kwargs["k"] = torch.randn(images, heads, prefix + side * side, dh, generator=g).to(k_dtype)
        if source == "qk_prior":
            kwargs["prior"] = torch.rand(images, side * side, generator=g)
    units = hu * wu
    kwargs["keep"] = draw(st.one_of(st.integers(1, units), st.floats(1e-3, 1.0)))
    return kwargs


def _public(backend: str):
    def run(inputs):
        kept, idx = ak.attentive_mask(**inputs, backend=backend)
        suffix = "_triton" if backend == "triton" else ""
        return kept, idx, getattr(torch.ops.aclip_kernels, "attentive_mask_backward" + suffix)
    return run


def _schema(native):
    def run(inputs):
        args = check_mask_args(inputs["x"], inputs.get("scores"), inputs["keep"], inputs.get("q"), inputs.get("k"),
                               inputs.get("prior"), inputs["num_prefix_tokens"], inputs["grid"], inputs["block"],
                               inputs.get("boxes"), None)
        kept, idx = native.ops.attentive_mask(*args)
        return kept, idx, native.ops.attentive_mask_backward
    return run


def check_problem(run, inputs, cls_attention=None) -> None:
    kept, idx, backward = run(inputs)
    assert_mask_matches_reference(kept, idx, inputs)
    p, n = inputs["num_prefix_tokens"], inputs["x"].shape[1] - inputs["num_prefix_tokens"]
    grad = torch.randn(kept.shape[0], kept.shape[1], kept.shape[2] + 2, dtype=kept.dtype)[..., 1:-1]
    torch.testing.assert_close(backward(grad, idx, p, n), scatter_tokens_ref(grad, idx, p, n), rtol=0, atol=0)
    if cls_attention is not None and "q" in inputs:
        assert_cls_attention_close(cls_attention(inputs["q"], inputs["k"], p), inputs["q"], inputs["k"], p)


FUZZ = dict(deadline=None, derandomize=True,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])


@pytest.mark.skipif(ASAN, reason="this is the AddressSanitizer run (test_native_cpu_under_asan)")
@pytest.mark.skipif("cpu" not in ak.compiled_backends(), reason="the compiled library aclip_kernels._C is not built")
@settings(max_examples=300, **FUZZ)
@given(problem=mask_problems())
def test_cpu(problem):
    check_problem(_public("cpu"), problem, lambda q, k, p: ak.cls_attention(q, k, num_prefix_tokens=p, backend="cpu"))


@pytest.mark.skipif(ASAN, reason="the Triton interpreter has no compiled code to sanitize")
@pytest.mark.filterwarnings("ignore::RuntimeWarning")
@settings(max_examples=30, **FUZZ)
@given(problem=mask_problems())
def test_triton(problem):
    check_problem(_public("triton"), problem,
                  lambda q, k, p: ak.cls_attention(q, k, num_prefix_tokens=p, backend="triton"))


@settings(max_examples=300, **FUZZ)
@given(problem=mask_problems())
def test_emulated_cuda(emulated_cuda, problem):
    check_problem(_schema(emulated_cuda), problem,
                  lambda q, k, p: emulated_cuda.ops.cls_attention(q, k, p, q.shape[-1] ** -0.5, None))


if ASAN:  # the installed library is not a sanitizer build: its C++ CPU kernels run in test_cpu
    @settings(max_examples=300, **FUZZ)
    @given(problem=mask_problems())
    def test_native_cpu_under_asan(native_cpu, problem):
        check_problem(_schema(native_cpu), problem,
                      lambda q, k, p: native_cpu.ops.cls_attention(q, k, p, q.shape[-1] ** -0.5, None))

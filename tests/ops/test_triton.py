"""The Triton backend against the reference: exact indices and gathered rows, exact backward,
cls_attention within CLS_ATTENTION_TOL.

The parity grid itself runs on every backend in test_attentive_mask.py and test_cls_attention.py; these
are the Triton-specific cases. Without CUDA the kernels run in the Triton interpreter on CPU tensors
(TRITON_INTERPRET=1, set by tests/conftest.py); with CUDA on the GPU, plus the ``requires_cuda`` ones
(full grid, torch.compile).
"""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import aclip_kernels as ak
from aclip_kernels.triton import _common
from aclip_kernels.ops._checks import check_mask_args
from aclip_kernels.reference import cls_attention_ref, scatter_tokens_ref
from aclip_kernels.reference import attentive_mask_ref
from aclip_kernels.testing import (MaskCase, assert_cls_attention_close, assert_mask_matches_reference,
                                   cls_attention_inputs, make_mask_inputs, mask_cases, random_boxes,
                                   requires_cuda, score_tolerance)

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"

if not CUDA and not _common.INTERPRET:
    raise RuntimeError("aclip_kernels.triton was imported without TRITON_INTERPRET=1 (tests/conftest.py sets it); "
                       "its kernels cannot run on this GPU-less machine")


def _assert_matches(kept, idx, inputs):
    """Bit-exact in the interpreter; on a GPU, fused q/k scores only within ``score_tolerance``."""
    assert_mask_matches_reference(kept, idx, inputs, score_tolerance(inputs) if CUDA else None)


def _mask_args(inputs: dict):
    return check_mask_args(inputs["x"], inputs.get("scores"), inputs["keep"], inputs.get("q"),
                           inputs.get("k"), inputs.get("prior"), inputs["num_prefix_tokens"],
                           inputs["grid"], inputs["block"], inputs.get("boxes"), None)


@pytest.mark.parametrize("case", [
    next(c for c in mask_cases() if c.id == "vitb16-aclip"),        # ViT-B/16, D 768, 2 views, b 2, boxes
    MaskCase("vitl14-448-p8-d2048", images=1, grid=(32, 32), prefix=8, width=2048, dtype=torch.bfloat16),
    MaskCase("vitl14-448-fused", images=1, grid=(32, 32), prefix=8, width=32, scores="qk_prior", heads=2),
], ids=lambda c: c.id)
def test_attentive_mask_large_shapes(case):
    inputs = make_mask_inputs(case, device=DEVICE)
    kept, idx = ak.attentive_mask(**inputs, backend="triton")
    _assert_matches(kept, idx, inputs)


def _extreme_scores(rows: int, grid) -> torch.Tensor:
    """Scores full of the values a key must order exactly: NaN, +-inf, +-0.0, denormals, ties."""
    g = torch.Generator().manual_seed(1)
    pool = torch.tensor([float("nan"), float("inf"), float("-inf"), 0.0, -0.0, 1e-40, -1e-40, 2e-45,
                         1.0, 1.0, -1.0, 3.4e38, -3.4e38, 1e-38])
    return pool[torch.randint(0, len(pool), (rows, *grid), generator=g)]


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy on inf - inf in the interpreter
@pytest.mark.parametrize("block", [1, 2])
@pytest.mark.parametrize("boxes", [False, True])
@pytest.mark.parametrize("keep", [1, 5, 16])
def test_attentive_mask_extreme_scores(block, boxes, keep):
    g = torch.Generator().manual_seed(2)
    grid = (8, 8)
    x = torch.randn(2, 2 + 64, 16, generator=g)
    inputs = dict(x=x, scores=_extreme_scores(2, grid), keep=keep, num_prefix_tokens=2, grid=grid,
                  block=block, boxes=random_boxes(2, g) if boxes else None)
    inputs = {k: (v.to(DEVICE) if isinstance(v, torch.Tensor) else v) for k, v in inputs.items()}
    kept, idx = ak.attentive_mask(**inputs, backend="triton")
    _assert_matches(kept, idx, inputs)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_score_dtypes_and_strides(dtype):
    """Scores of any float dtype (rounded to float32 as the reference does) and strides; fused
    q/k in float64 with a strided prior."""
    g = torch.Generator().manual_seed(5)
    x = torch.randn(4, 1 + 36, 16, generator=g).to(DEVICE)
    scores = torch.randn(2, 72, generator=g).to(dtype).to(DEVICE)[:, ::2]  # [2, 36], column stride 2
    boxes = random_boxes(4, g).to(DEVICE)
    inputs = dict(x=x, scores=scores, keep=0.5, grid=(6, 6), block=2, boxes=boxes)
    _assert_matches(*ak.attentive_mask(**inputs, backend="triton"), inputs)
    q = torch.randn(2, 3, 8, generator=g, dtype=torch.float64).to(DEVICE)
    k = torch.randn(2, 3, 1 + 36, 8, generator=g, dtype=torch.float64).to(DEVICE)
    prior = torch.rand(36, 2, generator=g).to(DEVICE).t()
    inputs = dict(x=x, q=q, k=k, prior=prior, keep=9, grid=(6, 6), boxes=boxes)
    _assert_matches(*ak.attentive_mask(**inputs, backend="triton"), inputs)


@st.composite
def _mask_problems(draw):
    block = draw(st.sampled_from([1, 2, 3]))
    grid = (block * draw(st.integers(1, 5)), block * draw(st.integers(1, 5)))
    units = (grid[0] // block) * (grid[1] // block)
    images, views, prefix = draw(st.integers(1, 2)), draw(st.integers(1, 2)), draw(st.integers(0, 3))
    score_grid = draw(st.sampled_from([grid, (draw(st.integers(1, 7)), draw(st.integers(1, 7)))]))
    keep = draw(st.one_of(st.integers(1, units), st.floats(0.01, 1.0)))
    seed = draw(st.integers(0, 2 ** 16))
    g = torch.Generator().manual_seed(seed)
    kind = draw(st.sampled_from(["randn", "ties", "nan", "extreme"]))
    if kind == "extreme":
        scores = _extreme_scores(images, score_grid)
    elif kind == "ties":
        scores = torch.randint(0, 2, (images, *score_grid), generator=g).float()
    else:
        scores = torch.randn(images, *score_grid, generator=g)
        if kind == "nan":
            scores[torch.rand(scores.shape, generator=g) < 0.3] = float("nan")
    x = torch.randn(images * views, prefix + grid[0] * grid[1], draw(st.integers(1, 24)), generator=g)
    boxes = random_boxes(images * views, g, min_size=0.2) if draw(st.booleans()) else None
    return dict(x=x.to(draw(st.sampled_from([torch.float32, torch.bfloat16]))), scores=scores, keep=keep,
                num_prefix_tokens=prefix, grid=grid, block=block, boxes=boxes)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
@settings(max_examples=25, deadline=None, derandomize=True)
@given(_mask_problems())
def test_attentive_mask_random_problems(problem):
    """Random grids (odd, non-square, block 3: a division by 9), score maps, boxes, keeps."""
    inputs = {k: (v.to(DEVICE) if isinstance(v, torch.Tensor) else v) for k, v in problem.items()}
    kept, idx = ak.attentive_mask(**inputs, backend="triton")
    _assert_matches(kept, idx, inputs)


def test_backward_writes_every_row():
    """The backward allocates grad_x uninitialised, so every row must be written (zeros too)."""
    attentive_mask_backward = torch.ops.aclip_kernels.attentive_mask_backward_triton
    grad = torch.ones(2, 3 + 4, 8, device=DEVICE)
    idx = torch.tensor([[0, 5, 6, 9], [1, 2, 3, 4]], device=DEVICE)
    for _ in range(3):  # fresh allocations may reuse dirty memory
        torch.empty(2, 3 + 10, 8, device=DEVICE).fill_(float("nan"))
        grad_x = attentive_mask_backward(grad, idx, 3, 10)
        torch.testing.assert_close(grad_x.cpu(), scatter_tokens_ref(grad.cpu(), idx.cpu(), 3, 10), rtol=0, atol=0)


def test_cls_attention_long_sequence_and_wide_heads():
    """T over several key tiles, Dh not a power of two, k a slice of a wider tensor."""
    g = torch.Generator().manual_seed(4)
    q = torch.randn(2, 3, 40, generator=g).to(DEVICE)
    k = torch.randn(2, 3, 600, 48, generator=g)[:, :, :577, 4:44].to(DEVICE)
    result = ak.cls_attention(q, k, num_prefix_tokens=1, scale=0.3, backend="triton")
    assert_cls_attention_close(result, q, k, 1, 0.3)


def test_cls_attention_gradients():
    q, k = cls_attention_inputs(2, 3, 1 + 9, 8, torch.float64, device=DEVICE, strided=True)
    q, k = q.requires_grad_(), k.requires_grad_()
    weight = torch.randn(2, 9, dtype=torch.float64, device=DEVICE)
    grads = torch.autograd.grad((ak.cls_attention(q, k, backend="triton") * weight).sum(), (q, k))
    ref = torch.autograd.grad((cls_attention_ref(q, k, 1) * weight).sum(), (q, k))
    for got, want in zip(grads, ref):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def test_opcheck():
    # The AOT-dispatch check traces the triton op into a graph, which needs a real GPU.
    utils = None if CUDA else ("test_schema", "test_autograd_registration", "test_faketensor")
    case = MaskCase("opcheck", grid=(4, 4), width=8, block=2, boxes=True, views=2)
    inputs = make_mask_inputs(case, device=DEVICE)
    inputs["x"].requires_grad_()
    torch.library.opcheck(torch.ops.aclip_kernels.attentive_mask_triton.default,
                          tuple(_mask_args(inputs)), test_utils=utils)
    q, k = cls_attention_inputs(2, 2, 9, 8, torch.float32, device=DEVICE)
    torch.library.opcheck(torch.ops.aclip_kernels.cls_attention_triton.default,
                          (q.requires_grad_(), k.requires_grad_(), 1, 0.3, None), test_utils=utils)


# ---- GPU only -------------------------------------------------------------------------------

@requires_cuda
@pytest.mark.parametrize("case", [c for c in mask_cases() if c.id in ("vitb16-aclip", "fused-qk", "strided-bf16")],
                         ids=lambda c: c.id)
def test_torch_compile_fullgraph(case):
    inputs = make_mask_inputs(case, device="cuda")
    args = list(tuple(_mask_args(inputs)))
    x = args[0].detach().requires_grad_()

    def masked(x, *rest):
        kept, idx = torch.ops.aclip_kernels.attentive_mask_triton(x, *rest)
        return kept * 2, idx

    compiled = torch.compile(masked, fullgraph=True)
    kept, idx = compiled(x, *args[1:])
    _assert_matches(kept / 2, idx, inputs)
    grad = torch.randn_like(kept)
    (grad_x,) = torch.autograd.grad(kept, x, grad)
    expected = scatter_tokens_ref(2 * grad.cpu(), idx.cpu(), case.prefix, x.shape[1] - case.prefix)
    torch.testing.assert_close(grad_x.cpu(), expected, rtol=0, atol=0)


@requires_cuda
def test_cls_attention_torch_compile_fullgraph():
    q, k = cls_attention_inputs(4, 12, 197, 64, torch.bfloat16, device="cuda", strided=True)
    prior = torch.rand(4, 196, device="cuda")
    compiled = torch.compile(lambda q, k, p: torch.ops.aclip_kernels.cls_attention_triton(q, k, 1, 0.125, p),
                             fullgraph=True)
    ref = prior.cpu() + cls_attention_ref(q.cpu(), k.cpu(), 1, 0.125)
    torch.testing.assert_close(compiled(q, k, prior).cpu(), ref, rtol=1e-6, atol=1e-5)


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_backward_on_cuda_large(dtype):
    case = MaskCase("vitl14-448", images=4, views=2, grid=(32, 32), prefix=8, width=1024, block=2,
                    boxes=True, dtype=dtype)
    inputs = make_mask_inputs(case, device="cuda")
    x = inputs.pop("x").detach().requires_grad_()
    kept, idx = ak.attentive_mask(x, **inputs, backend="triton")
    _assert_matches(kept, idx, dict(inputs, x=x.detach()))
    grad = torch.randn_like(kept)
    (grad_x,) = torch.autograd.grad(kept, x, grad)
    expected = scatter_tokens_ref(grad.cpu(), idx.cpu(), case.prefix, x.shape[1] - case.prefix)
    torch.testing.assert_close(grad_x.cpu(), expected, rtol=0, atol=0)


@requires_cuda
@pytest.mark.parametrize("tokens,heads,head_dim", [(197, 12, 64), (577, 16, 64), (1025, 16, 80)])
def test_cls_attention_vit_shapes_on_cuda(tokens, heads, head_dim):
    q, k = cls_attention_inputs(8, heads, tokens, head_dim, torch.bfloat16, device="cuda", strided=True)
    assert_cls_attention_close(ak.cls_attention(q, k, backend="triton"), q, k, 1)


def _huge_view(shape, strides, dtype, generator) -> torch.Tensor:
    """A view with element offsets past 2**31 (strides of a sequence-first packed qkv at large B),
    filled with random values; the storage is allocated but only the viewed elements are touched,
    so it costs virtual memory, not RAM."""
    extent = 1 + sum((n - 1) * s for n, s in zip(shape, strides))
    assert extent > 2 ** 31
    view = torch.empty(extent, dtype=dtype).as_strided(shape, strides)
    view.copy_(torch.randn(shape, generator=generator).to(dtype))
    return view


@pytest.mark.skipif(CUDA, reason="a > 2**31-element view is virtual memory on the CPU only")
def test_offsets_past_int32_range():
    """Every stride product is int64: the q/k token stride, x's and grad_kept's column stride and
    the score map's stride each put element offsets past 2**31 (int32 products would wrap)."""
    g = torch.Generator().manual_seed(6)
    big = 800_000_000  # x 3 score cells, x 4 tokens, x 15 columns / 4: > 2**31
    k = _huge_view((1, 2, 5, 16), (0, 16, big, 1), torch.bfloat16, g)
    q = torch.randn(1, 2, 16, generator=g).to(torch.bfloat16)
    assert_cls_attention_close(ak.cls_attention(q, k, backend="triton"), q, k.clone(), 1)

    x = _huge_view((2, 5, 16), (16 * 5, 16, big // 4), torch.bfloat16, g)
    scores = _huge_view((1, 4), (0, big), torch.float32, g)
    for inputs in (dict(scores=scores.view(1, 2, 2)), dict(q=q, k=k)):
        kept, idx = ak.attentive_mask(x, **inputs, keep=2, backend="triton")
        assert_mask_matches_reference(kept, idx, dict({n: t.clone() for n, t in inputs.items()}, x=x.clone(), keep=2))

    attentive_mask_backward = torch.ops.aclip_kernels.attentive_mask_backward_triton
    grad = _huge_view((2, 3, 16), (48, 16, big // 4), torch.bfloat16, g)
    idx = torch.tensor([[0, 3], [1, 2]])
    torch.testing.assert_close(attentive_mask_backward(grad, idx, 1, 4),
                               scatter_tokens_ref(grad.clone(), idx, 1, 4), rtol=0, atol=0)


def test_near_ties_are_checked_within_the_score_tolerance():
    """On hardware the fused scores are only within ``score_tolerance`` of the reference. Row 0 has
    a near-tie at the selection boundary: a perturbation of the scores within the tolerance flips
    it, which the exact check rejects and the tolerant one accepts; a genuinely wrong selection
    still fails. Row 1 is separated, so it is compared exactly even with a tolerance."""
    tol = (0.0, 1e-5)
    g = torch.Generator().manual_seed(7)
    scores = torch.stack([torch.randperm(16, generator=g) for _ in range(2)]).float().view(2, 4, 4) / 16
    near = (scores[0] == 7 / 16).nonzero()[0].tolist()  # the best dropped unit of row 0 (keep 8)
    scores[0, near[0], near[1]] = 8 / 16 - 2e-6
    inputs = dict(x=torch.randn(2, 1 + 16, 8, generator=g), scores=scores, keep=8, grid=(4, 4),
                  num_prefix_tokens=1)
    flipped = scores.clone()
    flipped[0, near[0], near[1]] += 4e-6  # within the tolerance: now ranked 8th
    kept, idx = attentive_mask_ref(**dict(inputs, scores=flipped))
    assert not torch.equal(idx, attentive_mask_ref(**inputs)[1])
    with pytest.raises(AssertionError):
        assert_mask_matches_reference(kept, idx, inputs)
    assert_mask_matches_reference(kept, idx, inputs, tol)

    wrong = scores.clone()
    wrong[0][scores[0] == 0] = 2.0  # the worst unit of row 0 kept instead
    with pytest.raises(AssertionError, match="more than"):
        assert_mask_matches_reference(*attentive_mask_ref(**dict(inputs, scores=wrong)), inputs, tol)
    swapped = flipped.clone()
    swapped[1][scores[1] == 7 / 16] = 1.0  # row 1 separated by 1/16: the exact comparison applies
    with pytest.raises(AssertionError, match="separated"):
        assert_mask_matches_reference(*attentive_mask_ref(**dict(inputs, scores=swapped)), inputs, tol)
    with pytest.raises(AssertionError):  # rows gathered for another idx
        assert_mask_matches_reference(attentive_mask_ref(**inputs)[0], idx, inputs, tol)
    # The tolerant check on fused q/k scores with blocks, boxes and two views accepts the reference.
    fused = make_mask_inputs(next(c for c in mask_cases(quick=True) if c.id == "fused-qk"))
    assert score_tolerance(fused) is not None
    assert_mask_matches_reference(*attentive_mask_ref(**fused), fused, score_tolerance(fused))


def test_direct_op_calls_are_checked_after_the_public_path():
    """The public path checks its arguments once and the Triton op impl skips its own check for
    that call only: a later direct call of the registered op, and one after a public call that
    failed inside the op, still get the op's clear errors."""
    case = MaskCase("checked", grid=(4, 4), width=8, boxes=True)
    inputs = make_mask_inputs(case, device=DEVICE)
    args = list(tuple(_mask_args(inputs)))
    ak.attentive_mask(**inputs, backend="triton")
    with pytest.raises(ValueError, match="num_units=99"):
        torch.ops.aclip_kernels.attentive_mask_triton(*args[:10], 99, args[11])
    with pytest.raises(ValueError, match="boxes must be finite"):
        ak.attentive_mask(**dict(inputs, boxes=torch.full_like(inputs["boxes"], float("nan"))), backend="triton")
    with pytest.raises(ValueError, match="num_units=0"):
        torch.ops.aclip_kernels.attentive_mask_triton(*args[:10], 0, args[11])
    q, k = cls_attention_inputs(2, 2, 9, 8, torch.float32, device=DEVICE)
    ak.cls_attention(q, k, backend="triton")
    with pytest.raises(ValueError, match="num_prefix_tokens=9"):
        torch.ops.aclip_kernels.cls_attention_triton(q, k, 9, 0.3, None)


def test_autotune_keys_name_kernel_parameters():
    """Triton's autotuner silently drops a key that names no parameter: every key must name one,
    and the keys must include the row bucket (and, for the forward, block and boxes)."""
    from aclip_kernels.triton import compile_check
    kernels = {"fwd": compile_check.am._mask_fwd_kernel, "bwd": compile_check.am._mask_bwd_kernel}
    for name, kernel in kernels.items():
        assert set(kernel.keys) <= set(kernel.fn.arg_names), (name, kernel.keys)
        assert "rows_bucket" in kernel.keys, name
    assert {"BLOCK", "HAS_BOXES"} <= set(kernels["fwd"].keys)


def test_vector_width_of_row_copies():
    """Elements per copy access: up to 16 bytes, dividing D, the row strides and the offset."""
    from aclip_kernels.triton._common import vector_width
    assert vector_width(torch.zeros(2, 5, 100)) == 4                          # 400-byte rows: 16 bytes
    assert vector_width(torch.zeros(2, 5, 100, dtype=torch.bfloat16)) == 4    # 200-byte rows: 8 bytes
    assert vector_width(torch.zeros(2, 5, 64, dtype=torch.bfloat16)) == 8
    assert vector_width(torch.zeros(2, 5, 99)) == 1
    assert vector_width(torch.zeros(2, 5, 72)[:, :, 2:66]) == 2               # offset 2 elements
    assert vector_width(torch.zeros(2, 64, 5).transpose(1, 2)) == 1           # no unit last stride

"""attentive_mask on every backend against the reference: exact indices, gathered rows and gradient
over the shared case grid (aclip_kernels.testing), then properties and gradients."""
import pytest
import torch
from hypothesis import given, settings, strategies as st

import aclip_kernels as ak
from aclip_kernels import reference as ref
from aclip_kernels.testing import (assert_cls_attention_close, assert_mask_matches_reference, make_mask_inputs,
                                   mask_cases, random_boxes, score_tolerance)

CASES = mask_cases()
QUICK = {c.id: c for c in mask_cases(quick=True)}  # the interpreter runs the grid at widths <= 64
BACKWARD_CASES = ([c.id for c in CASES if c.grid == (8, 8)][:12]
                  + ["strided-bf16", "odd-7x9-boxes", "keep1-b2"])
CPU_BACKENDS = ["torch"] + [b for b in ak.compiled_backends() if b == "cpu"]
needs_compiled = pytest.mark.skipif("cpu" not in ak.compiled_backends(),
                                    reason="the compiled library aclip_kernels._C is not built")


def _case(case_id: str, op_backend):
    return QUICK[case_id] if op_backend.interpreted else next(c for c in CASES if c.id == case_id)


@pytest.mark.parametrize("case_id", [c.id for c in CASES])
def test_matches_reference(case_id, op_backend):
    inputs = make_mask_inputs(_case(case_id, op_backend), device=op_backend.device)
    kept, idx = ak.attentive_mask(**inputs, backend=op_backend.name)
    assert kept.device.type == op_backend.device and idx.device.type == op_backend.device
    # On a GPU, fused q/k scores only within score_tolerance (hardware exp, FMA); elsewhere bit-exact.
    assert_mask_matches_reference(kept, idx, inputs, score_tolerance(inputs) if op_backend.device == "cuda" else None)


@pytest.mark.parametrize("case_id", BACKWARD_CASES)
def test_backward_matches_reference(case_id, op_backend):
    case = _case(case_id, op_backend)
    inputs = make_mask_inputs(case, device=op_backend.device)
    x = inputs.pop("x").detach().requires_grad_()
    kept, idx = ak.attentive_mask(x, **inputs, backend=op_backend.name)
    # A non-contiguous incoming gradient, as autograd may hand it over.
    grad = torch.randn(kept.shape[0], kept.shape[2], kept.shape[1], device=op_backend.device)
    grad = grad.to(kept.dtype).transpose(1, 2)
    (grad_x,) = torch.autograd.grad(kept, x, grad)
    expected = ref.scatter_tokens_ref(grad.cpu(), idx.cpu(), case.prefix, x.shape[1] - case.prefix)
    assert grad_x.dtype == x.dtype
    torch.testing.assert_close(grad_x.cpu(), expected, rtol=0, atol=0)


@st.composite
def mask_problem(draw):
    hu, wu = draw(st.integers(1, 6)), draw(st.integers(1, 6))
    block = draw(st.sampled_from([1, 2]))
    prefix, views, images = draw(st.integers(0, 3)), draw(st.integers(1, 2)), draw(st.integers(1, 3))
    grid = (hu * block, wu * block)
    units = hu * wu
    keep = draw(st.one_of(st.integers(1, units), st.floats(1e-3, 1.0)))
    seed = draw(st.integers(0, 2 ** 16))
    use_boxes = draw(st.booleans())
    return grid, block, prefix, views, images, keep, seed, use_boxes


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@settings(max_examples=60, deadline=None)
@given(problem=mask_problem())
def test_properties(backend, problem):
    grid, block, prefix, views, images, keep, seed, use_boxes = problem
    g = torch.Generator().manual_seed(seed)
    n = grid[0] * grid[1]
    x = torch.randn(images * views, prefix + n, 5, generator=g)
    scores = torch.randint(0, 4, (images, *grid), generator=g).float()   # many ties
    boxes = random_boxes(images * views, g) if use_boxes else None
    kept, idx = ak.attentive_mask(x, scores, keep, num_prefix_tokens=prefix, grid=grid, block=block,
                                  boxes=boxes, backend=backend)
    units = (grid[0] // block) * (grid[1] // block)
    count = ref.num_keep_units(keep, units) * block * block
    assert idx.shape == (x.shape[0], count) and kept.shape == (x.shape[0], prefix + count, 5)
    assert (idx[:, 1:] > idx[:, :-1]).all()                         # ascending and unique
    assert ((0 <= idx) & (idx < n)).all()
    assert torch.equal(kept[:, :prefix], x[:, :prefix])               # prefix first, unchanged
    rows = torch.arange(x.shape[0])[:, None]
    assert torch.equal(kept[:, prefix:], x[rows, prefix + idx])       # kept rows are rows of x
    if block > 1:                                                     # whole blocks are kept
        r, c = idx // grid[1], idx % grid[1]
        unit = (r // block) * (grid[1] // block) + c // block
        per_unit = torch.zeros(x.shape[0], units, dtype=torch.long).scatter_add_(1, unit, torch.ones_like(unit))
        assert ((per_unit == 0) | (per_unit == block * block)).all()


@needs_compiled
def test_gather_backward_gradcheck_float64():
    x = torch.randn(3, 1 + 16, 4, dtype=torch.float64, requires_grad=True)
    scores = torch.randn(3, 16, dtype=torch.float64)
    fn = lambda t: ak.attentive_mask(t, scores, 6, backend="cpu")[0]  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x,))


@needs_compiled
def test_gradient_is_exactly_zero_outside_kept_rows():
    x = torch.randn(2, 5 + 64, 8, requires_grad=True)
    kept, idx = ak.attentive_mask(x, torch.randn(2, 64), 0.25, num_prefix_tokens=5, block=2, backend="cpu")
    kept.backward(torch.randn_like(kept))
    dropped = torch.ones(2, 64, dtype=torch.bool).scatter_(1, idx, False)
    assert (x.grad[:, 5:][dropped] == 0).all()
    assert (x.grad[:, 5:][~dropped] != 0).all()


@needs_compiled
def test_offsets_past_int32_cpu(far_apart_inputs):
    """Every offset product must be int64: the images of x and k are 2**31 + 64 elements apart."""
    kept, idx = ak.attentive_mask(**far_apart_inputs, backend="cpu")
    assert_mask_matches_reference(kept, idx, far_apart_inputs)
    q, k = far_apart_inputs["q"], far_apart_inputs["k"]
    assert_cls_attention_close(ak.cls_attention(q, k, backend="cpu"), q, k, 1)

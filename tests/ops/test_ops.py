"""Public ops on the CPU backends: properties, gradients, torch.library registration, compile,
dispatch and the fallback when the compiled library is missing."""
import subprocess
import sys
import textwrap

import pytest
import torch
from hypothesis import given, settings, strategies as st

import aclip_kernels as ak
from aclip_kernels import reference as ref
from aclip_kernels.testing import random_boxes

CPU_BACKENDS = ["torch"] + [b for b in ak.compiled_backends() if b == "cpu"]
needs_compiled = pytest.mark.skipif("cpu" not in ak.compiled_backends(),
                                    reason="the compiled library aclip_kernels._C is not built")


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
    fn = lambda t: ak.attentive_mask(t, scores, 6, backend="cpu")[0]
    assert torch.autograd.gradcheck(fn, (x,))


@needs_compiled
def test_gradient_is_exactly_zero_outside_kept_rows():
    x = torch.randn(2, 5 + 64, 8, requires_grad=True)
    kept, idx = ak.attentive_mask(x, torch.randn(2, 64), 0.25, num_prefix_tokens=5, block=2, backend="cpu")
    kept.backward(torch.randn_like(kept))
    dropped = torch.ones(2, 64, dtype=torch.bool).scatter_(1, idx, False)
    assert (x.grad[:, 5:][dropped] == 0).all()
    assert (x.grad[:, 5:][~dropped] != 0).all()


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_cls_attention_gradcheck(backend):
    q = torch.randn(2, 3, 4, dtype=torch.float64, requires_grad=True)
    k = torch.randn(2, 3, 1 + 9, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: ak.cls_attention(a, b, backend=backend), (q, k))


def test_cls_attention_prior_accumulates():
    q, k = torch.randn(2, 3, 8), torch.randn(2, 3, 17, 8)
    for backend in CPU_BACKENDS:
        prior = torch.ones(2, 16)
        scores = ak.cls_attention(q, k, prior=prior, backend=backend)
        scores = ak.cls_attention(q, k, prior=scores, backend=backend)
        torch.testing.assert_close(scores, 1 + 2 * ref.cls_attention_ref(q, k, 1))
        assert (prior == 1).all()


def test_cls_attention_deprecated_out_accumulates_in_place():
    q, k = torch.randn(2, 3, 8), torch.randn(2, 3, 17, 8)
    for backend in CPU_BACKENDS:
        out = torch.ones(2, 16)
        with pytest.warns(DeprecationWarning, match="prior"):
            result = ak.cls_attention(q, k, out=out, backend=backend)
        assert result is out
        with pytest.warns(DeprecationWarning):
            ak.cls_attention(q, k, out=out, backend=backend)
        torch.testing.assert_close(out, 1 + 2 * ref.cls_attention_ref(q, k, 1))
        with pytest.raises(ValueError, match="not both"), pytest.warns(DeprecationWarning):
            ak.cls_attention(q, k, out=out, prior=out, backend=backend)


@needs_compiled
def test_opcheck():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 1 + 64, 8, generator=g, requires_grad=True)
    q, k = torch.randn(2, 3, 8, generator=g), torch.randn(2, 3, 65, 8, generator=g)
    boxes = random_boxes(4, g)
    op = torch.ops.aclip_kernels
    torch.library.opcheck(op.attentive_mask, (x, torch.randn(2, 64, generator=g), None, None, None, boxes,
                                              1, [8, 8], [8, 8], 2, 8, 0.0))
    torch.library.opcheck(op.attentive_mask, (x, None, q, k, torch.rand(2, 64), None, 1, [8, 8], [8, 8], 1, 10,
                                              8 ** -0.5))
    torch.library.opcheck(op.cls_attention, (q.requires_grad_(), k, 1, 0.3, None))
    torch.library.opcheck(op.cls_attention, (q, k, 1, 0.3, torch.rand(2, 64)))
    torch.library.opcheck(op.attentive_mask_backward,
                          (torch.randn(4, 1 + 12, 8), torch.arange(12).expand(4, 12).contiguous(), 1, 64))


@needs_compiled
def test_torch_compile_fullgraph():
    torch._dynamo.reset()

    def step(x, q, k, boxes):
        scores = ak.cls_attention(q, k)          # default dispatch: reads $ACLIP_KERNELS_BACKEND in the graph
        kept = ak.attentive_mask(x, scores, 0.5, block=2, boxes=boxes, return_indices=False)
        return (kept * 2).sum()

    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 1 + 64, 8, generator=g, requires_grad=True)
    q, k = torch.randn(2, 3, 8, generator=g), torch.randn(2, 3, 65, 8, generator=g)
    boxes = random_boxes(4, g)
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    loss = compiled(x, q, k, boxes)
    (grad,) = torch.autograd.grad(loss, x)
    loss_ref = step(x, q, k, boxes)
    (grad_ref,) = torch.autograd.grad(loss_ref, x)
    torch.testing.assert_close(loss, loss_ref)
    torch.testing.assert_close(grad, grad_ref)


def test_random_mask_is_uniform_and_reproducible():
    x = torch.randn(2000, 1 + 16, 1)
    kept, idx = ak.random_mask(x, 4, generator=torch.Generator().manual_seed(0))
    kept2, idx2 = ak.random_mask(x, 4, generator=torch.Generator().manual_seed(0))
    assert torch.equal(idx, idx2) and torch.equal(kept, kept2)
    frequency = torch.bincount(idx.flatten(), minlength=16) / (2000 * 4 / 16)
    assert (frequency - 1).abs().max() < 0.1                     # each patch kept ~1/4 of the time
    _, idx_blocks = ak.random_mask(torch.randn(8, 36, 3), 0.5, num_prefix_tokens=0, grid=(6, 6), block=3,
                                   generator=torch.Generator().manual_seed(1))
    assert idx_blocks.shape == (8, 18)


def test_backends_agree_on_random_mask():
    x = torch.randn(4, 1 + 63, 8)
    outs = [ak.random_mask(x, 0.5, grid=(7, 9), generator=torch.Generator().manual_seed(3), backend=b)
            for b in CPU_BACKENDS]
    for kept, idx in outs[1:]:
        assert torch.equal(idx, outs[0][1]) and torch.equal(kept, outs[0][0])


def test_auto_backend_on_cpu():
    expected = "cpu" if "cpu" in ak.compiled_backends() else "torch"
    assert ak.resolve_backend("auto", torch.device("cpu")) == expected
    assert ak.available_backends("cpu")[-1] == "torch"


def test_missing_or_mismatched_library_warns_once_and_falls_back():
    script = textwrap.dedent("""
        import sys, types, warnings
        fake = types.ModuleType("aclip_kernels._build_info")
        fake.TORCH_VERSION, fake.WITH_CUDA = "0.0.1", False
        sys.modules["aclip_kernels._build_info"] = fake
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            import torch, aclip_kernels as ak
            kept, idx = ak.attentive_mask(torch.randn(2, 17, 4), torch.randn(2, 16), 4)
            ak.cls_attention(torch.randn(2, 1, 4), torch.randn(2, 1, 17, 4))
        messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
        assert len(messages) == 1 and "built for torch 0.0.1" in messages[0], messages
        assert ak.compiled_backends() == () and idx.shape == (2, 4)
        try:
            ak.attentive_mask(torch.randn(2, 17, 4), torch.randn(2, 16), 4, backend="cpu")
        except RuntimeError as e:
            assert "backend='cpu' is not available" in str(e) and "built for torch 0.0.1" in str(e)
        else:
            raise AssertionError("backend='cpu' should not be available")
        print("ok")
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-2000:]

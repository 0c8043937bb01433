"""The ops through torch.library on the CPU: opcheck, torch.compile, the choice of backend and the
fallback when the compiled library is missing."""
import subprocess
import sys
import textwrap

import pytest
import torch

import aclip_kernels as ak
from aclip_kernels.testing import random_boxes

needs_compiled = pytest.mark.skipif("cpu" not in ak.compiled_backends(),
                                    reason="the compiled library aclip_kernels._C is not built")


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


@needs_compiled
@pytest.mark.parametrize("grad_mode", [True, False])
@pytest.mark.parametrize("needs_grad", ["none", "x", "scores"])
def test_the_autograd_kernel_is_skipped_only_when_no_gradient_is_needed(monkeypatch, grad_mode, needs_grad):
    """The public ops call below the Autograd key (``aclip_kernels._op_call.call_op``) exactly when the op's
    registered (Python) autograd kernel would only redispatch: the result's autograd state is the
    direct op call's, and that kernel, which looks ``torch._C.is_grad_enabled`` up on entry, is not
    entered."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 1 + 64, 8, generator=g, requires_grad=needs_grad == "x")
    scores = torch.randn(2, 64, generator=g, requires_grad=needs_grad == "scores")
    q, k = torch.randn(2, 3, 8, generator=g, requires_grad=needs_grad == "x"), torch.randn(2, 3, 65, 8, generator=g)
    entered = []
    original = torch._C.is_grad_enabled
    monkeypatch.setattr(torch._C, "is_grad_enabled", lambda: entered.append(1) or original())
    with torch.set_grad_enabled(grad_mode):
        kept, idx = ak.attentive_mask(x, scores, 0.5, block=2, backend="cpu")
        attention = ak.cls_attention(q, k, backend="cpu")
        public = len(entered)
        direct = torch.ops.aclip_kernels.attentive_mask(x, scores, None, None, None, None, 1, [8, 8], [8, 8], 2, 8, 1.0)
        direct_attention = torch.ops.aclip_kernels.cls_attention(q, k, 1, 8 ** -0.5, None)
    assert len(entered) == public + 2  # the direct calls entered the autograd kernel, once each
    assert torch.equal(kept, direct[0]) and torch.equal(idx, direct[1]) and torch.equal(attention, direct_attention)
    assert (kept.grad_fn is None) == (direct[0].grad_fn is None) == (not grad_mode or needs_grad == "none")
    assert (attention.grad_fn is None) == (direct_attention.grad_fn is None) == (not grad_mode or needs_grad != "x")
    assert public == (0 if not grad_mode or needs_grad == "none" else 1 + (needs_grad == "x"))

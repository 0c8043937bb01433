"""cls_attention on every backend against the reference (within CLS_ATTENTION_TOL), its gradients,
and the prior that accumulates layers (and the deprecated ``out=``)."""
import pytest
import torch

import aclip_kernels as ak
from aclip_kernels import reference as ref
from aclip_kernels.testing import assert_cls_attention_close, cls_attention_inputs

CPU_BACKENDS = ["torch"] + [b for b in ak.compiled_backends() if b == "cpu"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("prefix", [0, 1, 5])
@pytest.mark.parametrize("strided", [False, True])
def test_matches_reference(dtype, prefix, strided, op_backend):
    q, k = cls_attention_inputs(3, 4, prefix + 49, 16, dtype, device=op_backend.device, strided=strided)
    result = ak.cls_attention(q, k, num_prefix_tokens=prefix, backend=op_backend.name)
    assert result.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert_cls_attention_close(result, q, k, prefix)


def test_prior_accumulates(op_backend):
    q, k = cls_attention_inputs(2, 3, 17, 8, torch.float32, device=op_backend.device)
    prior = torch.ones(2, 16, device=op_backend.device)
    scores = ak.cls_attention(q, k, prior=prior, backend=op_backend.name)
    scores = ak.cls_attention(q, k, prior=scores, backend=op_backend.name)
    torch.testing.assert_close(scores.cpu(), 1 + 2 * ref.cls_attention_ref(q.cpu(), k.cpu(), 1), rtol=1e-5, atol=1e-5)
    assert (prior == 1).all()


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_gradcheck(backend):
    q = torch.randn(2, 3, 4, dtype=torch.float64, requires_grad=True)
    k = torch.randn(2, 3, 1 + 9, 4, dtype=torch.float64, requires_grad=True)
    prior = torch.randn(2, 9, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b, c: ak.cls_attention(a, b, prior=c, backend=backend), (q, k, prior))


def test_deprecated_out_accumulates_in_place():
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

"""The compiled C++ CPU kernels against the reference: exact indices and gathered rows."""
import pytest
import torch

import aclip_kernels as ak
from aclip_kernels.testing import (assert_cls_attention_close, assert_mask_matches_reference,
                                   cls_attention_inputs, make_mask_inputs, mask_cases)

pytestmark = pytest.mark.skipif("cpu" not in ak.compiled_backends(),
                                reason="the compiled library aclip_kernels._C is not built")


@pytest.mark.parametrize("case", mask_cases(), ids=lambda c: c.id)
def test_attentive_mask_matches_reference(case):
    inputs = make_mask_inputs(case)
    kept, idx = ak.attentive_mask(**inputs, backend="cpu")
    assert_mask_matches_reference(kept, idx, inputs)


@pytest.mark.parametrize("case", [c for c in mask_cases() if c.grid == (8, 8)][:12], ids=lambda c: c.id)
def test_backward_matches_reference(case):
    inputs = make_mask_inputs(case)
    x = inputs.pop("x").detach().requires_grad_()
    kept, idx = ak.attentive_mask(x, **inputs, backend="cpu")
    grad = torch.randn_like(kept)
    (grad_x,) = torch.autograd.grad(kept, x, grad)
    expected = ak.reference.scatter_tokens_ref(grad, idx, case.prefix, x.shape[1] - case.prefix)
    torch.testing.assert_close(grad_x, expected, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("prefix", [0, 1, 5])
@pytest.mark.parametrize("strided", [False, True])
def test_cls_attention_matches_reference(dtype, prefix, strided):
    q, k = cls_attention_inputs(3, 4, prefix + 49, 16, dtype, strided=strided)
    assert_cls_attention_close(ak.cls_attention(q, k, num_prefix_tokens=prefix, backend="cpu"), q, k, prefix)

"""The CUDA backend (csrc/cuda): that the build compiled it (CI, no GPU needed), and on a GPU its
parity with the reference and with the Triton backend, the backward, cls_attention, row layouts
the vectorised copy must handle, bad input and opcheck."""
import os
import shutil

import pytest
import torch

import aclip_kernels as ak
from aclip_kernels._library import BUILD_INFO, LOAD_ERROR
from aclip_kernels.reference import attentive_mask_ref, cls_attention_ref, scatter_tokens_ref
from aclip_kernels.testing import (CLS_ATTENTION_TOL, assert_cls_attention_close, assert_mask_matches_reference,
                                   cls_attention_inputs, make_mask_inputs, mask_cases, random_boxes, requires_cuda,
                                   score_tolerance)

DEVICE = "cuda"
BACKEND = "cuda"
OPS = ("cls_attention", "attentive_mask", "attentive_mask_backward")


def _nvcc():
    found = shutil.which("nvcc")
    candidate = os.path.join(os.environ.get("CUDA_HOME", "/usr/local/cuda"), "bin", "nvcc")
    return found or (candidate if os.access(candidate, os.X_OK) else None)


@pytest.mark.skipif(not (torch.version.cuda and _nvcc()), reason="needs a CUDA build of torch and nvcc")
@pytest.mark.skipif(os.environ.get("ACLIP_KERNELS_CUDA", "AUTO").upper() in ("OFF", "0", "FALSE", "NO"),
                    reason="ACLIP_KERNELS_CUDA turns the CUDA build off")
def test_cuda_kernels_were_built():
    info = BUILD_INFO
    assert info is not None, LOAD_ERROR
    assert info.WITH_CUDA, "nvcc and a CUDA torch are present but aclip_kernels._C was built without CUDA"
    requested = os.environ.get("TORCH_CUDA_ARCH_LIST", "8.0;9.0").replace(" ", ";")
    expected = {a.replace("+PTX", "").replace(".", "") for a in requested.split(";") if a}
    assert expected <= set(info.CUDA_ARCHS.split(",")), info.CUDA_ARCHS
    assert "cuda" in ak.compiled_backends()
    for op in OPS:
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"aclip_kernels::{op}", "CUDA"), op


# ---- parity with the reference (GPU) -----------------------------------------------------------

def layout_cases(device):
    """(name, attentive_mask kwargs) built on ``device``: row widths and layouts that take the
    narrower copy units, strided and offset x, and the largest grids (ViT-L/14@448, P=8, D=2048)."""
    g = torch.Generator().manual_seed(1)

    def randn(*shape, dtype=torch.float32):
        return torch.randn(*shape, generator=g).to(device=device, dtype=dtype)

    def scores(*shape):
        return randn(*shape)

    cases = []
    for width, dtype in [(42, torch.bfloat16), (3, torch.float16), (5, torch.float32), (1, torch.bfloat16),
                         (7, torch.float64), (8, torch.bfloat16), (0, torch.float32)]:
        cases.append((f"width{width}-{str(dtype)[6:]}",
                      dict(x=randn(3, 1 + 36, width, dtype=dtype), scores=scores(3, 6, 6), keep=0.5, block=1)))
    flat = randn(2 * 65 * 16 + 1)
    cases.append(("storage-offset", dict(x=flat[1:].view(2, 65, 16), scores=scores(2, 8, 8), keep=0.3, block=2)))
    cases.append(("last-dim-stride2", dict(x=randn(2, 65, 32)[:, :, ::2], scores=scores(2, 8, 8), keep=10)))
    cases.append(("wide-slice-bf16", dict(x=randn(4, 65, 784, dtype=torch.bfloat16)[::2, :, 8:776],
                                          scores=scores(2, 8, 8), keep=0.5, block=2)))
    cases.append(("expanded-batch", dict(x=randn(1, 65, 16).expand(4, 65, 16), scores=scores(2, 8, 8), keep=10)))
    cases.append(("vitl14-448-p8", dict(x=randn(2, 8 + 1024, 2048, dtype=torch.bfloat16), scores=scores(2, 32, 32),
                                        keep=0.5, num_prefix_tokens=8)))
    cases.append(("vitl14-448-b2-boxes", dict(x=randn(4, 1 + 1024, 64), scores=scores(2, 16, 16), keep=0.5, block=2,
                                              boxes=random_boxes(4, g).to(device))))
    cases.append(("rect-32x64-b4-boxes", dict(x=randn(2, 2 + 2048, 8), scores=scores(2, 10, 20), keep=0.6,
                                              num_prefix_tokens=2, grid=(32, 64), block=4,
                                              boxes=random_boxes(2, g).to(device))))
    cases.append(("vitl14-336-ties-sorted", dict(x=randn(2, 1 + 576, 16),
                                                 scores=torch.randint(0, 3, (2, 24, 24), generator=g).float().to(device),
                                                 keep=0.5)))
    nan_scores = scores(2, 24, 24)
    nan_scores[torch.rand(2, 24, 24, generator=g).to(device) < 0.3] = float("nan")
    cases.append(("vitl14-336-nan-sorted", dict(x=randn(2, 1 + 576, 16), scores=nan_scores, keep=0.8)))
    cases.append(("vitl14-336-keep-all", dict(x=randn(2, 1 + 576, 16), scores=scores(2, 24, 24), keep=1.0)))
    cases.append(("one-patch", dict(x=randn(2, 2, 4), scores=scores(2, 1, 1), keep=1)))
    cases.append(("p0-all-tied", dict(x=randn(2, 64, 4), scores=torch.zeros(2, 8, 8, device=device), keep=17,
                                      num_prefix_tokens=0)))
    cases.append(("all-nan", dict(x=randn(2, 65, 4), scores=torch.full((2, 8, 8), float("nan"), device=device),
                                  keep=5)))
    signed = torch.tensor([float("inf"), float("-inf"), 0.0, -0.0, float("nan")] * 13, device=device)[:64]
    cases.append(("inf-and-signed-zero", dict(x=randn(2, 65, 4), scores=signed.view(1, 8, 8).repeat(2, 1, 1),
                                              keep=20)))
    cases.append(("fused-qk-fp64-prior", dict(x=randn(2, 1 + 64, 8, dtype=torch.float64),
                                              q=randn(2, 3, 16, dtype=torch.float64),
                                              k=randn(2, 3, 65, 16, dtype=torch.float64), prior=randn(2, 64),
                                              keep=0.5)))
    cases.append(("fused-qk-strided-views", dict(x=randn(4, 1 + 196, 32), q=randn(2, 12, 64),
                                                 k=randn(2, 197, 3, 12, 64).permute(2, 0, 3, 1, 4)[1],
                                                 keep=0.5, block=2, grid=(14, 14),
                                                 boxes=random_boxes(4, g).to(device))))
    return cases


@requires_cuda
@pytest.mark.parametrize("name", [name for name, _ in layout_cases("cpu")])
def test_attentive_mask_layouts(name):
    inputs = dict(layout_cases(DEVICE))[name]
    kept, idx = ak.attentive_mask(**inputs, backend=BACKEND)
    assert_mask_matches_reference(kept, idx, inputs, score_tolerance(inputs))


def _backward_check(x, inputs, grad_layout):
    x = x.detach().requires_grad_()
    p = inputs.get("num_prefix_tokens", 1)
    kept, idx = ak.attentive_mask(x, **inputs, backend=BACKEND)
    grad = torch.randn_like(kept)
    if grad_layout == "strided":
        grad = torch.randn(*kept.shape[:2], kept.shape[2] + 3, device=kept.device, dtype=kept.dtype)[..., 1:-2]
    elif grad_layout == "expanded":
        grad = torch.randn(1, 1, kept.shape[2], device=kept.device, dtype=kept.dtype).expand(kept.shape)
    (grad_x,) = torch.autograd.grad(kept, x, grad)
    expected = scatter_tokens_ref(grad.cpu(), idx.cpu(), p, x.shape[1] - p)
    torch.testing.assert_close(grad_x.cpu(), expected, rtol=0, atol=0)


@requires_cuda
@pytest.mark.parametrize("case", mask_cases(), ids=lambda c: c.id)
def test_backward_matches_reference(case):
    inputs = make_mask_inputs(case, device=DEVICE)
    _backward_check(inputs.pop("x"), inputs, "contiguous")


@requires_cuda
@pytest.mark.parametrize("grad_layout", ["contiguous", "strided", "expanded"])
@pytest.mark.parametrize("name", ["width42-bfloat16", "width3-float16", "storage-offset", "vitl14-448-p8",
                                  "rect-32x64-b4-boxes"])
def test_backward_layouts(name, grad_layout):
    inputs = dict(layout_cases(DEVICE))[name]
    _backward_check(inputs.pop("x"), inputs, grad_layout)


@requires_cuda
def test_random_mask_matches_reference_backend():
    x = torch.randn(6, 1 + 196, 40, device=DEVICE)
    results = [ak.random_mask(x, 0.25, block=2, generator=torch.Generator(device=DEVICE).manual_seed(3), backend=b)
               for b in (BACKEND, "torch")]
    torch.testing.assert_close(results[0][1], results[1][1], rtol=0, atol=0)
    torch.testing.assert_close(results[0][0], results[1][0], rtol=0, atol=0)


@requires_cuda
def test_attentive_mask_on_side_stream():
    inputs = make_mask_inputs(mask_cases()[1], device=DEVICE)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        kept, idx = ak.attentive_mask(**inputs, backend=BACKEND)
    stream.synchronize()
    assert_mask_matches_reference(kept, idx, inputs, score_tolerance(inputs))


@requires_cuda
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_attentive_mask_on_second_device():
    inputs = make_mask_inputs(mask_cases()[1], device="cuda:1")
    kept, idx = ak.attentive_mask(**inputs, backend=BACKEND)
    assert kept.device == torch.device("cuda:1")
    assert_mask_matches_reference(kept, idx, inputs, score_tolerance(inputs))


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("prefix", [0, 1, 5])
@pytest.mark.parametrize("strided", [False, True])
@pytest.mark.parametrize("shape", [(3, 4, 49, 16), (2, 16, 1024, 64), (2, 3, 9, 1), (2, 2, 300, 80)],
                         ids=["small", "vitl448", "dh1", "dh80"])
def test_cls_attention_matches_reference(dtype, prefix, strided, shape):
    b, h, n, dh = shape
    q, k = cls_attention_inputs(b, h, prefix + n, dh, dtype, device=DEVICE, strided=strided)
    assert_cls_attention_close(ak.cls_attention(q, k, num_prefix_tokens=prefix, backend=BACKEND), q, k, prefix)


@requires_cuda
def test_cls_attention_adds_the_prior():
    q, k = cls_attention_inputs(4, 12, 197, 64, torch.bfloat16, device=DEVICE, strided=True)
    prior = torch.rand(4, 196, device=DEVICE)
    expected = prior.cpu() + cls_attention_ref(q.cpu(), k.cpu(), 1)
    result = ak.cls_attention(q, k, prior=prior, backend=BACKEND)
    rtol, atol = CLS_ATTENTION_TOL[torch.bfloat16]
    torch.testing.assert_close(result.cpu(), expected, rtol=rtol, atol=atol)


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_cls_attention_split_and_unsplit_batches(dtype):
    """Two images split into one block per head (B * H <= 2 * SMs) and the same two images among
    2 * SMs images, one block each (unsplit): both match the reference, and each other."""
    sms = torch.cuda.get_device_properties(DEVICE).multi_processor_count
    q, k = cls_attention_inputs(2 * sms, 12, 197, 64, dtype, device=DEVICE, strided=True)
    prior = torch.rand(2 * sms, 196, device=DEVICE)
    unsplit = ak.cls_attention(q, k, prior=prior, backend=BACKEND)
    split = ak.cls_attention(q[:2], k[:2], prior=prior[:2], backend=BACKEND)
    rtol, atol = CLS_ATTENTION_TOL[dtype]
    expected = prior[:2].cpu() + cls_attention_ref(q[:2].cpu(), k[:2].cpu(), 1)
    torch.testing.assert_close(split.cpu(), expected, rtol=rtol, atol=atol)
    torch.testing.assert_close(unsplit[:2].cpu(), expected, rtol=rtol, atol=atol)
    torch.testing.assert_close(split, unsplit[:2], rtol=1e-5, atol=1e-6)


@requires_cuda
def test_cls_attention_gradients():
    q, k = cls_attention_inputs(2, 3, 50, 16, torch.float64, device=DEVICE)
    q.requires_grad_()
    k.requires_grad_()
    torch.autograd.gradcheck(lambda a, b: ak.cls_attention(a, b, backend=BACKEND), (q, k))


# ---- parity with the Triton backend (GPU) --------------------------------------------------------

def _import_triton_backend():
    try:
        import aclip_kernels.triton  # noqa: F401
    except Exception as exc:  # the Triton backend is optional; say why it is not tested
        pytest.skip(f"the Triton backend does not import: {type(exc).__name__}: {exc}")


@requires_cuda
@pytest.mark.parametrize("case", mask_cases(), ids=lambda c: c.id)
def test_attentive_mask_matches_triton(case):
    _import_triton_backend()
    inputs = make_mask_inputs(case, device=DEVICE)
    kept, idx = ak.attentive_mask(**inputs, backend=BACKEND)
    kept_t, idx_t = ak.attentive_mask(**inputs, backend="triton")
    torch.testing.assert_close(idx, idx_t, rtol=0, atol=0)
    torch.testing.assert_close(kept, kept_t, rtol=0, atol=0, equal_nan=True)


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("strided", [False, True])
def test_cls_attention_matches_triton(dtype, strided):
    _import_triton_backend()
    q, k = cls_attention_inputs(4, 12, 197, 64, dtype, device=DEVICE, strided=strided)
    rtol, atol = CLS_ATTENTION_TOL[dtype]
    torch.testing.assert_close(ak.cls_attention(q, k, backend=BACKEND), ak.cls_attention(q, k, backend="triton"),
                               rtol=rtol, atol=atol)


# ---- bad input on the CUDA path (GPU) ------------------------------------------------------------

@requires_cuda
def test_cpu_tensor_mixed_with_cuda_tensor_names_the_argument():
    x = torch.randn(2, 65, 8, device=DEVICE)
    q, k = torch.randn(2, 3, 16, device=DEVICE), torch.randn(2, 3, 65, 16, device=DEVICE)
    with pytest.raises(ValueError, match="scores is on cpu"):
        ak.attentive_mask(x, torch.randn(2, 64), 0.5, backend=BACKEND)
    with pytest.raises(ValueError, match="x is on"):
        ak.attentive_mask(x.cpu(), torch.randn(2, 64, device=DEVICE), 0.5)
    with pytest.raises(ValueError, match="k is on cpu"):
        ak.attentive_mask(x, q=q, k=k.cpu(), backend=BACKEND)
    with pytest.raises(ValueError, match="prior is on cpu"):
        ak.attentive_mask(x, q=q, k=k, prior=torch.rand(2, 64), backend=BACKEND)
    with pytest.raises(ValueError, match="boxes is on cpu"):
        ak.attentive_mask(x, torch.randn(2, 64, device=DEVICE), 0.5, boxes=torch.rand(2, 4), backend=BACKEND)
    with pytest.raises(ValueError, match="k is on cpu"):
        ak.cls_attention(q, k.cpu(), backend=BACKEND)
    with pytest.raises(ValueError, match="prior is on cpu"):
        ak.cls_attention(q, k, prior=torch.zeros(2, 64), backend=BACKEND)
    torch.cuda.synchronize()  # nothing reached a kernel, nothing failed asynchronously


@requires_cuda
def test_bad_input_to_the_op_itself_raises_on_the_host():
    op = torch.ops.aclip_kernels
    x = torch.randn(2, 65, 8, device=DEVICE)
    scores = torch.randn(2, 64, device=DEVICE)
    bad_calls = {
        "scores is on cpu": lambda: op.attentive_mask(x, scores.cpu(), None, None, None, None, 1, [8, 8], [8, 8], 1, 8, 0.0),
        "boxes is on cpu": lambda: op.attentive_mask(x, scores, None, None, None, torch.rand(2, 4), 1, [8, 8], [8, 8],
                                                     1, 8, 0.0),
        "num_units": lambda: op.attentive_mask(x, scores, None, None, None, None, 1, [8, 8], [8, 8], 1, 65, 0.0),
        "block": lambda: op.attentive_mask(x, scores, None, None, None, None, 1, [8, 8], [8, 8], 3, 1, 0.0),
        "tokens": lambda: op.attentive_mask(x, scores, None, None, None, None, 2, [8, 8], [8, 8], 1, 8, 0.0),
        "do not match score grid": lambda: op.attentive_mask(x, scores[:, :63], None, None, None, None, 1, [8, 8],
                                                             [8, 8], 1, 8, 0.0),
        "boxes must be": lambda: op.attentive_mask(x, scores, None, None, None, torch.rand(3, 4, device=DEVICE), 1,
                                                   [8, 8], [8, 8], 1, 8, 0.0),
        "either scores": lambda: op.attentive_mask(x, None, None, None, None, None, 1, [8, 8], [8, 8], 1, 8, 0.0),
        "k is on cpu": lambda: op.cls_attention(torch.randn(2, 3, 16, device=DEVICE), torch.randn(2, 3, 65, 16), 1,
                                                0.25, None),
        "idx": lambda: op.attentive_mask_backward(torch.randn(2, 9, 8, device=DEVICE),
                                                  torch.zeros(2, 8, dtype=torch.int32, device=DEVICE), 1, 64),
    }
    for message, call in bad_calls.items():
        with pytest.raises(RuntimeError, match=message):
            call()
    # Out-of-range indices reach the backward kernel only through a direct call; they are skipped.
    grad_x = op.attentive_mask_backward(torch.ones(2, 3, 8, device=DEVICE),
                                        torch.tensor([[-1, 70], [3, 64]], device=DEVICE), 1, 64)
    torch.cuda.synchronize()
    assert grad_x[:, 1:].abs().sum(-1).nonzero().tolist() == [[1, 3]]


# ---- torch.library (GPU) ------------------------------------------------------------------------

@requires_cuda
def test_opcheck():
    g = torch.Generator().manual_seed(0)
    op = torch.ops.aclip_kernels

    def on(*tensors):
        return [t.to(DEVICE) for t in tensors]

    x, = on(torch.randn(4, 1 + 64, 8, generator=g))
    x.requires_grad_()
    xb, = on(torch.randn(4, 1 + 64, 6, generator=g).to(torch.bfloat16))
    q, k, scores, prior, boxes = on(torch.randn(2, 3, 8, generator=g), torch.randn(2, 3, 65, 8, generator=g),
                                    torch.randn(2, 64, generator=g), torch.rand(2, 64, generator=g),
                                    random_boxes(4, g))
    torch.library.opcheck(op.attentive_mask, (x, scores, None, None, None, boxes, 1, [8, 8], [8, 8], 2, 8, 0.0))
    torch.library.opcheck(op.attentive_mask, (x, None, q, k, prior, None, 1, [8, 8], [8, 8], 1, 10, 8 ** -0.5))
    torch.library.opcheck(op.attentive_mask, (xb, scores, None, None, None, None, 1, [8, 8], [8, 8], 1, 20, 0.0))
    torch.library.opcheck(op.cls_attention, (q.clone().requires_grad_(), k, 1, 0.3, None))
    torch.library.opcheck(op.cls_attention, (q, k, 1, 0.3, prior))
    grad, idx = on(torch.randn(4, 1 + 12, 8, generator=g), torch.arange(12).expand(4, 12).contiguous())
    torch.library.opcheck(op.attentive_mask_backward, (grad, idx, 1, 64))


@requires_cuda
def test_torch_compile_fullgraph():
    torch._dynamo.reset()

    def step(x, q, k, boxes):
        scores = ak.cls_attention(q, k, backend=BACKEND)
        kept = ak.attentive_mask(x, scores, 0.5, block=2, boxes=boxes, return_indices=False, backend=BACKEND)
        return (kept * 2).sum()

    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 1 + 64, 8, generator=g).to(DEVICE).requires_grad_()
    q, k = torch.randn(2, 3, 8, generator=g).to(DEVICE), torch.randn(2, 3, 65, 8, generator=g).to(DEVICE)
    boxes = random_boxes(4, g).to(DEVICE)
    compiled = torch.compile(step, fullgraph=True)
    (grad,) = torch.autograd.grad(compiled(x, q, k, boxes), x)
    (expected,) = torch.autograd.grad(step(x, q, k, boxes), x)
    torch.testing.assert_close(grad, expected, rtol=0, atol=0)
    ref_kept, _ = attentive_mask_ref(x.detach().cpu(), cls_attention_ref(q.cpu(), k.cpu()), 0.5, block=2,
                                     boxes=boxes.cpu())
    assert grad.count_nonzero().item() == ref_kept[:, 1:].numel() + 4 * 8

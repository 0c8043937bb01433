"""cls_attention (every backend of the device) for one attention layer, beside that layer's SDPA
attention and the explicit attention map the published A-CLIP code computes (softmax(q k^T) kept,
its [CLS] row averaged over heads); forward only, as the EMA scorer runs it (no grad). q and k are
views of timm's packed qkv [B, T, 3, H, Dh]. Bytes moved: cls_attention and the explicit map, the
[CLS] query and all keys read and the [B, N] float32 scores written; SDPA, q, k, v read and the
output written.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

import aclip_kernels as ak

OP = "cls_attention"
PASSES = ("fwd",)
HEAD_DIM = 64


def methods(device) -> list:
    return [f"aclip_kernels.{b}" for b in ak.available_backends(device)] + ["sdpa_layer", "explicit_attention"]


def make_inputs(case) -> dict:
    g = torch.Generator().manual_seed(0)
    heads, tokens = case.width // HEAD_DIM, 1 + case.grid ** 2
    qkv = torch.randn(case.images, tokens, 3, heads, HEAD_DIM, generator=g).to(case.device, case.torch_dtype)
    q, k, v = qkv.permute(2, 0, 3, 1, 4)
    item = qkv.element_size()
    return dict(q=q, k=k, v=v, scores_bytes=k.numel() * item + q[:, :, 0].numel() * item
                + case.images * (tokens - 1) * 4, sdpa_bytes=4 * k.numel() * item)


def call(method: str, a: dict):
    q, k, v = a["q"], a["k"], a["v"]
    if method.startswith("aclip_kernels."):
        backend, q_cls = method.split(".", 1)[1], q[:, :, 0]
        return lambda: ak.cls_attention(q_cls, k, backend=backend), a["scores_bytes"]
    if method == "sdpa_layer":
        return lambda: F.scaled_dot_product_attention(q, k, v), a["sdpa_bytes"]

    def explicit():
        attn = (q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5).softmax(-1)
        return attn[:, :, 0, 1:].float().mean(1)
    return explicit, a["scores_bytes"]


def test_cls_attention(case, method, inputs, measure):
    fn, bytes_moved = call(method, inputs(make_inputs))

    def no_grad():
        with torch.no_grad():
            return fn()
    measure(no_grad, case, bytes_moved)

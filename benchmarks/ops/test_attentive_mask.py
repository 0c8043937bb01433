"""attentive_mask (every backend of the device) beside the published A-CLIP pipeline, timm-style
argsort + gather, open_clip's PatchDropout (random) and the index_select floor (the same rows copied
with known indices), forward and forward+backward. Every method keeps the prefix token and half of
the patches of every row (2x2 blocks, boxes). Bytes moved: forward, the kept rows read from x and
written; backward adds grad_kept read and all of grad_x written.
"""
from __future__ import annotations

import pytest
import torch

import aclip_kernels as ak
from aclip_kernels.baselines import aclip_published_mask, flat_row_indices, index_select_floor, timm_style_mask
from aclip_kernels.testing import random_boxes

OP = "attentive_mask"
PASSES = ("fwd", "fwd+bwd")
BLOCK, KEEP = 2, 0.5


def methods(device) -> list:
    return [f"aclip_kernels.{b}" for b in ak.available_backends(device)] + [
        "published_aclip", "timm_argsort_gather", "open_clip_PatchDropout", "index_select_floor"]


def make_inputs(case) -> dict:
    g = torch.Generator().manual_seed(0)
    bx, n = case.images * case.views, case.grid ** 2
    x = torch.randn(bx, 1 + n, case.width, generator=g).to(case.device, case.torch_dtype)
    x.requires_grad_(case.passes == "fwd+bwd")
    scores = torch.rand(case.images, n, generator=g).to(case.device)
    boxes = random_boxes(bx, g).to(case.device)
    _, idx = ak.attentive_mask(x.detach(), scores, KEEP, block=BLOCK, boxes=boxes, backend="torch")
    kept_bytes = idx.shape[0] * (1 + idx.shape[1]) * case.width * x.element_size()
    return dict(x=x, scores=scores, boxes=boxes, flat=flat_row_indices(idx, 1, 1 + n),
                units=ak.reference.num_keep_units(KEEP, (case.grid // BLOCK) ** 2), patch_scores=scores.repeat(2, 1),
                bytes=2 * kept_bytes if case.passes == "fwd" else 3 * kept_bytes + x.numel() * x.element_size())


def forward(method: str, a: dict):
    x = a["x"]
    if method.startswith("aclip_kernels."):
        backend = method.split(".", 1)[1]
        return lambda: ak.attentive_mask(x, a["scores"], KEEP, block=BLOCK, boxes=a["boxes"], return_indices=False,
                                         backend=backend)
    if method == "published_aclip":
        return lambda: aclip_published_mask(x, a["scores"], a["boxes"], a["units"], block=BLOCK)[0]
    if method == "timm_argsort_gather":
        return lambda: timm_style_mask(x, a["patch_scores"], a["units"] * BLOCK * BLOCK)[0]
    if method == "open_clip_PatchDropout":
        transformer = pytest.importorskip("open_clip.transformer", reason="open_clip is not installed")
        dropout = transformer.PatchDropout(1 - KEEP).train()
        return lambda: dropout(x)
    return lambda: index_select_floor(x, a["flat"])


def with_backward(fn, x):
    grad = torch.randn_like(fn())            # each method's own output shape, made once

    def run():
        fn().backward(grad)
        x.grad = None
    return run


def test_attentive_mask(case, method, inputs, measure):
    a = inputs(make_inputs)
    fn = forward(method, a)
    measure(fn if case.passes == "fwd" else with_backward(fn, a["x"]), case, a["bytes"])

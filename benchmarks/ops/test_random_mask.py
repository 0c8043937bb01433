"""random_mask, FLIP's mask (every backend of the device), beside open_clip's PatchDropout and
timm's patch dropout (random scores, argsort + gather) and the index_select floor; forward. Every
method keeps the prefix token and half of the patches of every row (single patches). Bytes moved:
the kept rows read from x and written.
"""
from __future__ import annotations

import pytest
import torch

import aclip_kernels as ak
from aclip_kernels.baselines import flat_row_indices, index_select_floor, timm_style_mask

OP = "random_mask"
PASSES = ("fwd",)
KEEP = 0.5


def methods(device) -> list:
    return [f"aclip_kernels.{b}" for b in ak.available_backends(device)] + [
        "timm_argsort_gather", "open_clip_PatchDropout", "index_select_floor"]


def make_inputs(case) -> dict:
    g = torch.Generator().manual_seed(0)
    bx, n = case.images * case.views, case.grid ** 2
    x = torch.randn(bx, 1 + n, case.width, generator=g).to(case.device, case.torch_dtype)
    num_keep = ak.reference.num_keep_units(KEEP, n)
    idx = torch.rand(bx, n, generator=g).argsort(1)[:, :num_keep].sort(1).values.to(case.device)
    return dict(x=x, n=n, num_keep=num_keep, flat=flat_row_indices(idx, 1, 1 + n),
                bytes=2 * bx * (1 + num_keep) * case.width * x.element_size())


def call(method: str, a: dict):
    x = a["x"]
    if method.startswith("aclip_kernels."):
        backend = method.split(".", 1)[1]
        return lambda: ak.random_mask(x, KEEP, return_indices=False, backend=backend)
    if method == "timm_argsort_gather":
        return lambda: timm_style_mask(x, torch.rand(x.shape[0], a["n"], device=x.device), a["num_keep"])[0]
    if method == "open_clip_PatchDropout":
        transformer = pytest.importorskip("open_clip.transformer", reason="open_clip is not installed")
        dropout = transformer.PatchDropout(1 - KEEP).train()
        return lambda: dropout(x)
    return lambda: index_select_floor(x, a["flat"])


def test_random_mask(case, method, inputs, measure):
    a = inputs(make_inputs)
    with torch.no_grad():
        fn = call(method, a)
    measure(fn, case, a["bytes"])

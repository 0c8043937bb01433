"""The Triton scoring kernel (aclip_kernels/triton/cls_attention.py: one program per (image, head
group), plus the combine kernel when G > 1) against the reference, through the public ops: dtypes,
prefixes, strides, head counts, G = 1 and G > 1, the prior, key counts that are not a multiple of
the key tile, head dims over one tile; and the fused attentive_mask that runs it first. Shapes stay
small: without a GPU the kernels run in the interpreter."""
import pytest
import torch

import aclip_kernels as ak
from aclip_kernels.reference import cls_attention_ref
from aclip_kernels.testing import (CLS_ATTENTION_TOL, MaskCase, assert_cls_attention_close,
                                   assert_mask_matches_reference, cls_attention_inputs, make_mask_inputs,
                                   random_boxes, score_tolerance)
from aclip_kernels.triton import cls_attention as scoring

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"


@pytest.fixture(params=[1, 2, None], ids=["G1", "G2", "Gauto"])
def groups(request, monkeypatch):
    """Force G head groups (None: the launcher's choice from B, H and the SM count)."""
    monkeypatch.setattr(scoring, "FORCE_GROUPS", request.param)
    return request.param


def _plan(q, k):
    b, h, t, dh = k.shape
    return scoring.score_plan(b, h, t, dh, q.dtype == torch.float64, scoring.sm_count(k.device),
                              scoring.FORCE_GROUPS)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("prefix", [0, 1, 4])
@pytest.mark.parametrize("heads", [1, 3, 12])
def test_matches_reference(dtype, prefix, heads, groups):
    """Sequence-first packed qkv strides (timm's layout); 12 heads pad to 16 lanes at G = 1."""
    q, k = cls_attention_inputs(3, heads, prefix + 19, 8, dtype, device=DEVICE, strided=True)
    result = ak.cls_attention(q, k, num_prefix_tokens=prefix, backend="triton")
    assert result.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert_cls_attention_close(result, q, k, prefix)
    if groups is not None:
        assert _plan(q, k)["groups"] == min(groups, heads)


@pytest.mark.parametrize("tokens,heads,head_dim", [(70, 3, 16), (1 + 22, 12, 64), (1 + 9, 2, 300)])
def test_key_tiles_and_head_dim_chunks(tokens, heads, head_dim, groups):
    """Keys over several tiles with a partial last one; a head dim over one tile (300 > 256: two
    Dh chunks, the second partial); q and k with odd strides (slices of wider tensors)."""
    g = torch.Generator().manual_seed(3)
    q = torch.randn(2, heads, head_dim + 5, generator=g)[:, :, 3:3 + head_dim].to(DEVICE)
    k = torch.randn(2, tokens + 2, heads, head_dim + 1, generator=g)[:, 1:-1, :, :head_dim].transpose(1, 2).to(DEVICE)
    plan = _plan(q, k)
    assert plan["SPLIT_DH"] == (head_dim > 256)
    if head_dim <= 256 and groups is not None:  # forced G = 1 / 2: several key tiles, the last partial
        assert plan["BLOCK_T"] < tokens and tokens % plan["BLOCK_T"], plan
    prior = torch.rand(2, 2 * (tokens - 1), generator=g).to(DEVICE)[:, ::2]  # column stride 2
    result = ak.cls_attention(q, k, num_prefix_tokens=1, scale=0.2, prior=prior, backend="triton")
    expected = prior.cpu() + cls_attention_ref(q.cpu(), k.cpu(), 1, 0.2)
    torch.testing.assert_close(result.cpu(), expected, rtol=1e-6, atol=1e-5)


def test_groups_are_deterministic_and_agree():
    """G > 1 combines the group partials in a fixed order: repeated calls are bitwise equal, and
    every G agrees with G = 1 within rounding."""
    q, k = cls_attention_inputs(2, 6, 1 + 30, 16, torch.float32, device=DEVICE, strided=True)
    results = {}
    for g in (1, 2, 3, 6):
        scoring.FORCE_GROUPS = g
        try:
            results[g] = ak.cls_attention(q, k, backend="triton")
            assert torch.equal(results[g], ak.cls_attention(q, k, backend="triton"))
        finally:
            scoring.FORCE_GROUPS = None
    for g in (2, 3, 6):
        torch.testing.assert_close(results[g], results[1], rtol=1e-6, atol=1e-7)


def test_extreme_logits(groups):
    """Softmaxes that are one-hot (huge logits) or flat (zero q) within one head group."""
    g = torch.Generator().manual_seed(8)
    q = torch.randn(2, 4, 8, generator=g) * 100
    q[:, 1] = 0.0
    k = torch.randn(2, 4, 1 + 20, 8, generator=g)
    result = ak.cls_attention(q.to(DEVICE), k.to(DEVICE), backend="triton")
    torch.testing.assert_close(result.cpu(), cls_attention_ref(q, k, 1), rtol=1e-5, atol=1e-6)


def test_plan_fills_the_gpu_with_head_groups():
    """G = 1 at training batches; below the SM count B * G reaches it where H allows; groups cover
    each head once; a head group's token fits one k tile."""
    assert scoring.score_plan(256, 12, 197, 64, False, 132, None)["groups"] == 1
    assert scoring.score_plan(256, 16, 257, 64, False, 132, None)["groups"] == 1
    for b, h, dh in ((64, 12, 64), (8, 12, 64), (8, 16, 64), (1, 3, 8), (33, 16, 128), (2, 64, 512)):
        plan = scoring.score_plan(b, h, 197, dh, False, 132, None)
        groups, hpg = plan["groups"], plan["hpg"]
        assert hpg * groups >= h > hpg * (groups - 1), (b, h, plan)
        assert b * groups >= 132 or groups == h, (b, h, plan)
        assert plan["BLOCK_H"] >= hpg and plan["BLOCK_H"] * plan["BLOCK_DH"] <= scoring.TILE, plan
    assert scoring.score_plan(8, 12, 197, 64, False, 132, 100)["groups"] == 12  # a forced G is clamped to H


@pytest.mark.parametrize("case", [
    MaskCase("fused-b2-boxes", grid=(6, 6), scores="qk", views=2, boxes=True, block=2, heads=3, width=16),
    MaskCase("fused-prior-p4", grid=(5, 5), scores="qk_prior", prefix=4, heads=12, width=8),
    MaskCase("fused-bf16-h1", grid=(5, 5), scores="qk", dtype=torch.bfloat16, heads=1, width=8),
    MaskCase("fused-strided-x", images=3, grid=(4, 4), scores="qk", strided=True, views=2, heads=4, width=8),
], ids=lambda c: c.id)
def test_fused_attentive_mask(case, groups):
    """The fused forward = scoring kernel + the mask kernel: exact on the interpreter, within the
    score tolerance on a GPU."""
    inputs = make_mask_inputs(case, device=DEVICE)
    kept, idx = ak.attentive_mask(**inputs, backend="triton")
    assert_mask_matches_reference(kept, idx, inputs, score_tolerance(inputs) if CUDA else None)


@pytest.mark.parametrize("prefix", [0, 1, 4])
def test_fused_attentive_mask_packed_qkv(prefix, groups):
    """q and k as sequence-first views of one packed qkv tensor (timm's layout), bf16, with a
    strided prior, 2 views with boxes."""
    g = torch.Generator().manual_seed(10)
    q, k = cls_attention_inputs(2, 3, prefix + 16, 8, torch.bfloat16, device=DEVICE, strided=True, seed=prefix)
    prior = torch.rand(16, 2, generator=g).to(DEVICE).t() / 16
    x = torch.randn(4, prefix + 16, 8, generator=g).to(DEVICE)
    inputs = dict(x=x, q=q, k=k, prior=prior, keep=0.5, num_prefix_tokens=prefix, grid=(4, 4), block=2,
                  boxes=random_boxes(4, g).to(DEVICE))
    kept, idx = ak.attentive_mask(**inputs, backend="triton")
    assert_mask_matches_reference(kept, idx, inputs, score_tolerance(inputs) if CUDA else None)


def test_fused_float64_scores_stay_float64(monkeypatch):
    """float64 q/k score in float64 (the [Bs, N] map the mask kernel reads), as the reference."""
    monkeypatch.setattr(scoring, "FORCE_GROUPS", 2)
    g = torch.Generator().manual_seed(9)
    q = torch.randn(2, 3, 8, generator=g, dtype=torch.float64).to(DEVICE)
    k = torch.randn(2, 3, 1 + 16, 8, generator=g, dtype=torch.float64).to(DEVICE)
    assert torch.ops.aclip_kernels.cls_attention_triton(q, k, 1, 0.3, None).dtype == torch.float64
    x = torch.randn(2, 1 + 16, 8, generator=g).to(DEVICE)
    inputs = dict(x=x, q=q, k=k, keep=5, grid=(4, 4))
    assert_mask_matches_reference(*ak.attentive_mask(**inputs, backend="triton"), inputs,
                                  CLS_ATTENTION_TOL[torch.float64] if CUDA else None)

"""timm Eva (EVA-CLIP / EVA-02 layouts: rope, fused qkv with a separate q bias, or separate q/k/v
projections) and attention-pooled timm / open_clip SigLIP towers (tiny random models, fp32, CPU):
patched == unpatched outside masking and in eval mode; the masked forward's first block sees the
gathered tokens and the rope embedding of exactly those positions; EMAScorer parity with timm's own
eager attention maps (fused_attn=False) and with the AttentionPoolLatent probe's attention at 1e-5."""
import copy

import pytest
import torch

from aclip_kernels import (AttentivePatchDropout, AttentivePatchDropoutWithIndices, EMAScorer, make_ema, masking,
                           patch_open_clip, patch_timm_vit)
from aclip_kernels.reference import cls_attention_ref, mean_query_attention_ref

timm = pytest.importorskip("timm")
from timm.models.eva import Eva  # noqa: E402

ATOL = 1e-5
SIZE, PATCH, GRID = 64, 8, 8
EVAS = {
    "eva02_rope_fused_qkv": dict(use_rot_pos_emb=True, qkv_bias=True, swiglu_mlp=True, scale_mlp=True),
    "rope_separate_qkv": dict(use_rot_pos_emb=True, qkv_fused=False),
    "eva01_abs_pos_patch_drop": dict(use_rot_pos_emb=False, patch_drop_rate=0.25),
}


def _eva(kind: str) -> Eva:
    torch.manual_seed(0)
    model = Eva(img_size=SIZE, patch_size=PATCH, embed_dim=64, depth=2, num_heads=4, num_classes=0, **EVAS[kind])
    with torch.no_grad():
        for blk in model.blocks:
            if blk.attn.q_bias is not None:
                blk.attn.q_bias.normal_()
            for w in (blk.attn.qkv, blk.attn.q_proj, blk.attn.k_proj):
                if w is not None:
                    w.weight.mul_(4.0)
    return model.eval()


@pytest.fixture(scope="module", params=list(EVAS))
def eva(request):
    return _eva(request.param)


def test_eva_patched_equals_unpatched_outside_masking_and_in_eval(eva):
    patched = patch_timm_vit(copy.deepcopy(eva))
    assert isinstance(patched.patch_drop, AttentivePatchDropoutWithIndices) and not patched.patch_drop.training
    images = torch.randn(2, 3, SIZE, SIZE)
    want = eva(images)
    assert torch.equal(patched(images), want)
    with masking(patched, scores=torch.rand(2, GRID * GRID), keep=4):
        assert torch.equal(patched(images), want)                    # eval keeps every token
    if eva.patch_drop is None:                                       # no patch dropout: train == eval path
        assert torch.equal(patched.train()(images), eva.train()(images))
        eva.eval()


def test_eva_masked_forward_sees_the_selected_tokens_and_their_rope(eva):
    model = copy.deepcopy(eva)
    raw, seen = [], []
    model.pos_drop.register_forward_hook(lambda m, a, out: raw.append(out))          # tokens after _pos_embed
    model.blocks[0].register_forward_pre_hook(lambda m, a, kw: seen.append((a[0], kw.get("rope"))), with_kwargs=True)
    patch_timm_vit(model).train()
    scores = torch.rand(2, GRID * GRID)
    with masking(model, scores=scores, keep=5, block=2) as state:
        model(torch.randn(2, 3, SIZE, SIZE))
    idx = state.indices
    assert idx.shape == (2, 20) and state.tokens == 1 + 20
    x, rope = seen[0]
    want = torch.cat([raw[0][:, :1], raw[0][:, 1:].gather(1, idx[..., None].expand(-1, -1, x.shape[2]))], 1)
    assert torch.equal(x, want)
    if model.rope is not None:
        full = model.rope.get_embed()                                 # [N, dim] for the native grid
        assert torch.equal(rope[:, 0], full[idx])                     # [B, 1, n, dim]: the kept positions'


def _eager_maps(model, images):
    maps = []
    ref = copy.deepcopy(model)
    for blk in ref.blocks:
        blk.attn.fused_attn = False
        blk.attn.attn_drop.register_forward_hook(lambda m, a, out: maps.append(out))
    ref(images)
    maps = torch.stack(maps)                                          # [L, B, H, T, T]
    assert maps.min() > 0                                             # log(maps) is finite: mean_query_attention_ref
    return maps


def test_eva_scorer_matches_eager_attention(eva):
    images = torch.randn(3, 3, SIZE, SIZE)
    scorer = EMAScorer(make_ema(patch_timm_vit(copy.deepcopy(eva))))
    assert scorer.source == "cls"
    output, scores = scorer.forward_with_output(images)
    maps = _eager_maps(eva, images)
    torch.testing.assert_close(scores, maps.mean(0)[:, :, 0, 1:].mean(1), atol=ATOL, rtol=0)
    assert torch.equal(output, eva(images))
    mean_query = EMAScorer(eva, source="mean-query")(images)           # the [CLS]-free rule, from the same maps
    want = torch.stack([mean_query_attention_ref(m, 1) for m in maps]).mean(0)
    torch.testing.assert_close(mean_query, want, atol=ATOL, rtol=0)


def test_eva_scorer_refuses_other_attention_kernels(eva):
    with pytest.raises(ValueError, match="attn='sdpa'"):
        EMAScorer(eva, attn="flash")


@pytest.fixture(scope="module")
def map_vit():
    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=SIZE, patch_size=PATCH, depth=2,
                             class_token=False, global_pool="map", num_classes=0).eval()


def _latent_probe_reference(pool, x):
    """softmax(q_norm(q(latent)) . k_norm(k(x)) * scale) of AttentionPoolLatent, mean over heads."""
    b, t, _ = x.shape
    q = pool.q_norm(pool.q(pool.latent).view(1, -1, pool.num_heads, pool.head_dim).transpose(1, 2))
    k = pool.k_norm(pool.kv(x).view(b, t, 2, pool.num_heads, pool.head_dim)[:, :, 0].transpose(1, 2))
    return cls_attention_ref(q[:, :, 0].expand(b, -1, -1), k, 0, pool.scale)


def test_attention_pooled_timm_vit_scores_with_its_probe(map_vit):
    model = patch_timm_vit(copy.deepcopy(map_vit))
    images = torch.randn(3, 3, SIZE, SIZE)
    assert torch.equal(model(images), map_vit(images))
    pooled = []
    map_vit.attn_pool.register_forward_pre_hook(lambda m, a: pooled.append(a[0]))
    map_vit(images)
    scorer = EMAScorer(make_ema(model))
    assert scorer.source == "probe"
    with torch.no_grad():
        want = _latent_probe_reference(map_vit.attn_pool, pooled[0])
    torch.testing.assert_close(scorer(images), want, atol=ATOL, rtol=0)
    maps = _eager_maps(map_vit, images)                               # the [CLS]-free rule from timm's own maps
    rule = torch.stack([mean_query_attention_ref(m) for m in maps]).mean(0)
    torch.testing.assert_close(EMAScorer(model, source="mean-query")(images), rule, atol=ATOL, rtol=0)
    model.train()
    with masking(model, scores=want, keep=4, block=2) as state:
        model(images)
    assert state.tokens == 16                                         # no prefix: n * b * b


def test_open_clip_siglip_scores_with_the_timm_probe():
    open_clip = pytest.importorskip("open_clip")
    torch.manual_seed(0)
    model = open_clip.create_model("ViT-B-16-SigLIP", pretrained=None).eval()
    patch_open_clip(model)
    assert isinstance(model.visual.trunk.patch_drop, AttentivePatchDropout)
    images = torch.randn(1, 3, 224, 224)
    pooled = []
    model.visual.trunk.attn_pool.register_forward_pre_hook(lambda m, a: pooled.append(a[0]))
    output, scores = EMAScorer(model).forward_with_output(images)
    assert torch.equal(output, model.encode_image(images))
    with torch.no_grad():
        want = _latent_probe_reference(model.visual.trunk.attn_pool, pooled[0])
    torch.testing.assert_close(scores, want, atol=ATOL, rtol=0)


def test_explicit_scores_run_on_eva(eva):
    from aclip_kernels.integrations.explicit import explicit_attention_scores
    images = torch.randn(2, 3, SIZE, SIZE)
    torch.testing.assert_close(explicit_attention_scores(eva, images), EMAScorer(eva)(images), atol=ATOL, rtol=0)

"""EMAScorer against explicit attention on randomly initialised timm vit_base_patch16_224 and
open_clip ViT-B-16 (fp32, B=2): scores within 1e-5, identical selections, identical model output;
the last-layer option; the reduced-resolution ("efficient") option; flash / xFormers paths."""
import importlib.machinery
import importlib.util
import sys
import types

import pytest
import torch
import torch.nn.functional as F
import torch.utils._python_dispatch
import torch.utils._pytree

import aclip_kernels
from aclip_kernels import EMAScorer, attentive_mask
from aclip_kernels.integrations import _models
from aclip_kernels.integrations.explicit import explicit_attention_scores
from aclip_kernels.testing import random_boxes

timm = pytest.importorskip("timm")
open_clip = pytest.importorskip("open_clip")

ATOL = 1e-5


def _sharpen(tower, kind, factor=4.0):
    """Scale the q and k projections so that random-init attention is far from uniform (so the
    selections are decided by real score differences, not by rounding)."""
    with torch.no_grad():
        for blk in _models.blocks(tower, kind):
            attn = blk.attn
            w = attn.qkv.weight if kind == "timm" else attn.in_proj_weight
            w[: 2 * w.shape[0] // 3] *= factor


@pytest.fixture(scope="module")
def timm_vit():
    torch.manual_seed(0)
    model = timm.create_model("vit_base_patch16_224", pretrained=False).eval()
    _sharpen(model, "timm")
    return model


@pytest.fixture(scope="module")
def open_clip_vit():
    torch.manual_seed(0)
    model = open_clip.create_model("ViT-B-16", pretrained=None).eval()
    _sharpen(model.visual, "open_clip")
    return model


@pytest.fixture(params=["timm", "open_clip"])
def vit(request, timm_vit, open_clip_vit):
    return timm_vit if request.param == "timm" else open_clip_vit


def _images(batch=2, size=224, seed=0):
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


def _same_selection(a, b, grid=(14, 14), views=1, **kwargs):
    x = torch.randn(views * a.shape[0], 1 + grid[0] * grid[1], 8)
    for block in (1, 2):
        _, ia = attentive_mask(x, a, 0.5, grid=grid, block=block, **kwargs)
        _, ib = attentive_mask(x, b, 0.5, grid=grid, block=block, **kwargs)
        assert torch.equal(ia, ib), f"selections differ at block={block}"


def test_scores_match_explicit_attention(vit):
    images = _images()
    scorer = EMAScorer(vit)
    output, scores = scorer.forward_with_output(images)
    ref_output, ref = explicit_attention_scores(vit, images, return_output=True)
    assert scores.shape == (2, 196) and scores.dtype == torch.float32 and scorer.grid == (14, 14)
    assert (scores - ref).abs().max().item() <= ATOL
    assert scores.std(dim=1).min() > 1e-4            # the attention is not uniform: a real test
    _same_selection(scores, ref)
    # the scorer only reads: the output is the model's own (under no_grad, as the scorer runs), bit
    # for bit
    with torch.no_grad():
        plain = vit.visual(images) if hasattr(vit, "visual") else vit(images)
    assert torch.equal(output, plain)
    torch.testing.assert_close(ref_output, plain, rtol=1e-4, atol=1e-4)
    assert torch.equal(scorer(images), scores)


class _Shapes(torch.utils._python_dispatch.TorchDispatchMode):
    """Records the shape of every tensor an aten op returns."""

    def __init__(self):
        super().__init__()
        self.shapes = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in torch.utils._pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self.shapes.append(tuple(t.shape))
        return out


def test_no_attention_map_is_materialised(vit):
    images = _images(batch=1, seed=5)
    with _Shapes() as scorer_ops:
        EMAScorer(vit)(images)
    with _Shapes() as explicit_ops:
        explicit_attention_scores(vit, images)
    t = 197
    assert not [s for s in scorer_ops.shapes if s[-2:] == (t, t)]
    assert [s for s in explicit_ops.shapes if s[-2:] == (t, t)]          # the check can see maps


def test_last_layer(vit):
    images = _images(seed=1)
    scores = EMAScorer(vit, layers="last")(images)
    ref = explicit_attention_scores(vit, images, layers="last")
    assert (scores - ref).abs().max().item() <= ATOL
    _same_selection(scores, ref)
    assert (scores - EMAScorer(vit)(images)).abs().max() > 1e-4


def test_clip_model_and_its_visual_agree(open_clip_vit):
    images = _images(seed=2)
    assert torch.equal(EMAScorer(open_clip_vit)(images), EMAScorer(open_clip_vit.visual)(images))


@pytest.mark.parametrize("option", [dict(resolution=112), dict(downsample=2)])
def test_reduced_resolution(vit, option):
    images = _images(batch=2, seed=3)
    scorer = EMAScorer(vit, **option)
    scores = scorer(images)
    assert scorer.grid == (7, 7) and scores.shape == (2, 49)
    tower, kind = _models.vision_tower(vit)
    small = F.interpolate(images, size=(112, 112), mode="bilinear", align_corners=False, antialias=True)
    with _models.input_grid(tower, kind, (7, 7)):
        ref = explicit_attention_scores(vit, small)
    assert (scores - ref).abs().max().item() <= ATOL
    if "resolution" in option:   # the model is restored: full-resolution calls still work
        assert EMAScorer(vit, layers="last")(images).shape == (2, 196)
    # the online views (2 per image, 14x14 grid) select through box alignment
    boxes = random_boxes(4, torch.Generator().manual_seed(0))
    x = torch.randn(4, 197, 16)
    kept, idx = attentive_mask(x, scores.view(2, *scorer.grid), 0.5, grid=(14, 14), block=2, boxes=boxes)
    assert kept.shape == (4, 101, 16) and idx.shape == (4, 100)
    _same_selection(scores.view(2, 7, 7), ref.view(2, 7, 7), views=2, boxes=boxes)


def test_micro_batch(vit):
    """micro_batch=2 on 5 images: each micro-batch is the model's own forward (bit for bit), the
    scores equal the full batch's within ATOL with the same selections, and the peak memory is that
    of a 2-image forward."""
    from aclip_kernels.benchmarking import cpu_peak_bytes
    images = _images(batch=5, seed=4)
    scorer = EMAScorer(vit, micro_batch=2)
    output, scores = scorer.forward_with_output(images)
    full_output, full = EMAScorer(vit).forward_with_output(images)
    assert scores.shape == (5, 196) and scorer.grid == (14, 14)
    assert (scores - full).abs().max().item() <= ATOL
    _same_selection(scores, full)
    parts = [EMAScorer(vit).forward_with_output(chunk) for chunk in images.split(2)]
    assert torch.equal(scores, torch.cat([sc for _, sc in parts]))
    assert torch.equal(output, torch.cat([out for out, _ in parts]))
    torch.testing.assert_close(output, full_output, rtol=1e-4, atol=1e-4)
    if not hasattr(vit, "visual"):          # memory once (timm): B=8 in micro-batches of 2
        eight = _images(batch=8, seed=6)
        peak_micro = cpu_peak_bytes(lambda: EMAScorer(vit, micro_batch=2)(eight))
        peak_full = cpu_peak_bytes(lambda: EMAScorer(vit)(eight))
        assert peak_micro <= 0.4 * peak_full, (peak_micro, peak_full)


def test_bad_arguments(timm_vit):
    with pytest.raises(ValueError, match="layers"):
        EMAScorer(timm_vit, layers="first")
    with pytest.raises(ValueError, match="attn"):
        EMAScorer(timm_vit, attn="math")
    with pytest.raises(ValueError, match="not both"):
        EMAScorer(timm_vit, resolution=112, downsample=2)
    with pytest.raises(TypeError, match="not a timm VisionTransformer"):
        EMAScorer(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="images"):
        EMAScorer(timm_vit)(torch.randn(3, 224, 224))
    for bad in (0, -2, 1.5, True):
        with pytest.raises(ValueError, match="micro_batch"):
            EMAScorer(timm_vit, micro_batch=bad)


# --- flash-attn / xFormers ------------------------------------------------------------------------

MISSING = {attn: importlib.util.find_spec(mod) is None for attn, mod in (("flash", "flash_attn"),
                                                                         ("xformers", "xformers"))}
PACKAGE = {"flash": "flash-attn", "xformers": "xformers"}


@pytest.mark.parametrize("attn", ["flash", "xformers"])
def test_missing_package_is_a_clear_error(attn, timm_vit):
    if not MISSING[attn]:
        pytest.skip(f"{PACKAGE[attn]} is installed")
    with pytest.raises(ImportError, match=f"attn='{attn}' needs the {PACKAGE[attn]} package"):
        EMAScorer(timm_vit, attn=attn)


@pytest.mark.parametrize("attn", ["flash", "xformers"])
def test_fast_attention_package(attn, vit):
    if MISSING[attn]:
        pytest.skip(f"{PACKAGE[attn]} is not installed")
    if not torch.cuda.is_available():
        pytest.skip(f"{PACKAGE[attn]} needs a CUDA device")
    model = vit.cuda()
    try:
        images = _images().cuda()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            scores = EMAScorer(model, attn=attn)(images)
            ref = EMAScorer(model)(images)
        torch.testing.assert_close(scores, ref, rtol=0.05, atol=1e-3)
    finally:
        vit.cpu()


def _sdpa_stub(q, k, v, scale):             # [B, T, H, Dh] -> [B, T, H, Dh], as the packages do
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), scale=scale)
    return out.transpose(1, 2)


@pytest.fixture
def stub_packages(monkeypatch):
    """Stand-ins for flash_attn / xformers.ops with their call signatures, computing SDPA: they test
    the forward wrappers (projections, layouts, restore) on the CPU."""
    flash = types.ModuleType("flash_attn")
    flash.__spec__ = importlib.machinery.ModuleSpec("flash_attn", None)
    flash.flash_attn_func = lambda q, k, v, dropout_p=0.0, softmax_scale=None: _sdpa_stub(q, k, v, softmax_scale)
    xops = types.ModuleType("xformers.ops")
    xops.__spec__ = importlib.machinery.ModuleSpec("xformers.ops", None)
    xops.memory_efficient_attention = lambda q, k, v, scale=None: _sdpa_stub(q, k, v, scale)
    xformers = types.ModuleType("xformers")
    xformers.__spec__ = importlib.machinery.ModuleSpec("xformers", None)
    xformers.ops = xops
    monkeypatch.setitem(sys.modules, "flash_attn", flash)
    monkeypatch.setitem(sys.modules, "xformers", xformers)
    monkeypatch.setitem(sys.modules, "xformers.ops", xops)


@pytest.mark.parametrize("attn,kind", [("flash", "open_clip"), ("xformers", "timm")])
def test_fast_attention_wrappers_with_stub_packages(attn, kind, timm_vit, open_clip_vit, stub_packages):
    vit = timm_vit if kind == "timm" else open_clip_vit
    images = _images(seed=4)
    output, scores = EMAScorer(vit, attn=attn).forward_with_output(images)
    ref_output, ref = EMAScorer(vit).forward_with_output(images)
    # FlashAttention runs bf16 (the wrapper casts fp32 inputs), xFormers fp32; the first block's
    # scores come from the same projections whatever runs the attention
    if attn == "flash":
        assert F.cosine_similarity(output, ref_output, dim=-1).min() > 0.99
        assert (scores - ref).abs().max().item() <= 5e-3
    else:
        torch.testing.assert_close(output, ref_output, rtol=1e-4, atol=1e-4)
        assert (scores - ref).abs().max().item() <= ATOL
    first = EMAScorer(vit, layers=[0], attn=attn)(images)
    assert (first - EMAScorer(vit, layers=[0])(images)).abs().max().item() <= ATOL
    tower, kind = _models.vision_tower(vit)
    assert all("forward" not in blk.attn.__dict__ for blk in _models.blocks(tower, kind))


def test_dynamic_size_timm_and_non_square_grid():
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, dynamic_img_size=True, reg_tokens=2).eval()
    _sharpen(model, "timm")
    images = _images(seed=6)
    scorer = EMAScorer(model, resolution=(112, 160))
    scores = scorer(images)
    assert scorer.grid == (7, 10) and scores.shape == (2, 70)
    small = F.interpolate(images, size=(112, 160), mode="bilinear", align_corners=False, antialias=True)
    assert (scores - explicit_attention_scores(model, small)).abs().max().item() <= ATOL
    # a non-square score grid reaches the online grid through masking(score_grid=...)
    online = aclip_kernels.patch_timm_vit(timm.create_model("vit_tiny_patch16_224", pretrained=False)).train()
    seen = []
    online.blocks[0].register_forward_pre_hook(lambda m, args: seen.append(args[0].shape[1]))
    boxes = random_boxes(4, torch.Generator().manual_seed(1))
    with torch.no_grad(), aclip_kernels.masking(online, scores=scores, boxes=boxes, keep=0.5, block=2,
                                                score_grid=scorer.grid):
        online(torch.randn(4, 3, 224, 224))
    assert seen == [1 + 100]


def test_autocast_bf16_scores_close(timm_vit, open_clip_vit):
    images = _images(seed=7)
    for vit in (timm_vit, open_clip_vit):            # the first block: bf16 rounding only, no drift
        ref = EMAScorer(vit, layers=[0])(images)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            scores = EMAScorer(vit, layers=[0])(images)
        assert scores.dtype == torch.float32
        assert (scores - ref).abs().max().item() < 0.1 * ref.max().item()

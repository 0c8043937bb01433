"""transformers CLIP / SigLIP / SigLIP2 drop-in (tiny random models built from configs, fp32, CPU):
patched == unpatched outside masking and in eval mode (bit for bit); the masked forward's encoder sees
exactly the prefix + the gathered embeddings at the kept indices (P + n*b*b tokens); EMAScorer parity
with the library's eager attention weights at 1e-5: [CLS] rows for CLIP, the SigLIP head's probe, and
the [CLS]-free mean-query rule (the renormalised geometric mean of each eager map's rows)."""
import copy
import math
import pathlib
import re
import runpy

import pytest
import torch
import torch.nn.functional as F

from aclip_kernels import EMAScorer, make_ema, masking, patch_hf_clip
from aclip_kernels.integrations.hf import ATTRIBUTE, siglip2_inputs
from aclip_kernels.reference import mean_query_attention_ref
from aclip_kernels.testing import crop_views

transformers = pytest.importorskip("transformers", reason="transformers is not installed (pip install .[hf])")

ATOL = 1e-5
SIZE, PATCH, GRID = 64, 8, 8
VISION = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, patch_size=PATCH)
TEXT = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=2, vocab_size=99,
            max_position_embeddings=16, pad_token_id=0, bos_token_id=1, eos_token_id=2)
CLASSES = ["CLIPVisionModel", "CLIPVisionModelWithProjection", "CLIPModel", "SiglipVisionModel", "SiglipModel",
           "Siglip2VisionModel", "Siglip2Model"]


def _build(name: str, sharpen: float = 4.0):
    family = "Siglip2" if name.startswith("Siglip2") else "Siglip" if name.startswith("Siglip") else "CLIP"
    extra = {"num_patches": GRID * GRID} if family == "Siglip2" else {"image_size": SIZE}
    vision = getattr(transformers, f"{family}VisionConfig")(**VISION, **extra)
    if "Vision" in name:
        config = vision
    else:
        config = getattr(transformers, f"{family}Config")(text_config=getattr(transformers, f"{family}TextConfig")(**TEXT).to_dict(),
                                                          vision_config=vision.to_dict())
    torch.manual_seed(0)
    model = getattr(transformers, name)(config).eval()
    with torch.no_grad():                                # sharper-than-random attention
        for layer in _tower(model).encoder.layers:
            layer.self_attn.q_proj.weight.mul_(sharpen)
            layer.self_attn.k_proj.weight.mul_(sharpen)
    return model


def _tower(model):
    return getattr(model, "vision_model", model)


def _inputs(model, images):
    kwargs = siglip2_inputs(images, PATCH) if "Siglip2" in type(model).__name__ else {"pixel_values": images}
    if "Vision" not in type(model).__name__:
        kwargs["input_ids"] = torch.tensor([[1, 5, 7, 2], [1, 9, 3, 2]])
    return kwargs


def _outputs(out):
    return [v for v in out.values() if isinstance(v, torch.Tensor)] if isinstance(out, dict) else [out]


@pytest.fixture(scope="module", params=CLASSES)
def hf_model(request):
    return _build(request.param)


def test_patched_equals_unpatched_outside_masking_and_in_eval(hf_model):
    reference = hf_model
    patched = patch_hf_clip(copy.deepcopy(hf_model))
    assert patch_hf_clip(patched) is patched                          # idempotent
    assert patched.state_dict().keys() == reference.state_dict().keys()
    images = torch.randn(2, 3, SIZE, SIZE)
    scores = torch.rand(1, GRID * GRID)
    for train in (False, True):                                       # dropouts are 0: train is deterministic
        reference.train(train), patched.train(train)
        want = _outputs(reference(**_inputs(reference, images)))
        assert all(torch.equal(a, b) for a, b in zip(_outputs(patched(**_inputs(patched, images))), want))
        if not train:                                                 # eval keeps every token, masked or not
            with masking(patched, scores=scores.expand(2, -1), keep=0.25):
                assert all(torch.equal(a, b) for a, b in zip(_outputs(patched(**_inputs(patched, images))), want))
    reference.eval()


def test_masked_forward_sees_the_selected_tokens(hf_model):
    model = copy.deepcopy(hf_model)
    tower = _tower(model)
    raw, seen = [], []
    tower.embeddings.register_forward_hook(lambda m, a, out: raw.append(out))        # before the patch's hook
    tower.encoder.layers[0].register_forward_pre_hook(
        lambda m, a, kw: seen.append(a[0] if a else kw["hidden_states"]), with_kwargs=True)
    patch_hf_clip(model).train()
    prefix = getattr(tower, ATTRIBUTE).num_prefix_tokens
    assert prefix == (1 if "CLIP" in type(model).__name__ else 0)
    images, scores = torch.randn(2, 3, SIZE, SIZE), torch.rand(2, GRID * GRID)
    keep, block = 5, 2
    with masking(model, scores=scores, keep=keep, block=block) as state:
        model(**_inputs(model, images))
    idx = state.indices                                                # [2, n] ascending patch positions
    assert idx.shape == (2, keep * block * block) and state.tokens == prefix + keep * block * block
    emb = raw[0]
    want = torch.cat([emb[:, :prefix], emb[:, prefix:].gather(1, idx[..., None].expand(-1, -1, emb.shape[2]))], 1)
    if hasattr(tower, "pre_layrnorm"):
        want = tower.pre_layrnorm(want)
    assert torch.equal(seen[0], want)
    units = scores.view(2, GRID // block, block, GRID // block, block).sum((2, 4)).flatten(1)
    blocks_kept = (idx // GRID // block) * (GRID // block) + (idx % GRID) // block      # each 2x2 unit of idx
    assert [set(b.tolist()) for b in blocks_kept] == [set(t.tolist()) for t in units.topk(keep).indices]


def _eager(model):
    eager = copy.deepcopy(model)
    eager.set_attn_implementation("eager")
    return eager


def test_clip_scorer_matches_eager_cls_attention():
    for name in ("CLIPVisionModel", "CLIPModel"):
        model = patch_hf_clip(_build(name))
        images = torch.randn(3, 3, SIZE, SIZE)
        scorer = EMAScorer(make_ema(model))
        assert scorer.source == "cls"
        output, scores = scorer.forward_with_output(images)
        tower = _tower(_eager(model))
        out = tower(pixel_values=images, output_attentions=True)
        want = torch.stack(out.attentions).mean(0)[:, :, 0, 1:].mean(1)
        torch.testing.assert_close(scores, want, atol=ATOL, rtol=0)
        assert torch.equal(output.pooler_output, _tower(model)(pixel_values=images).pooler_output)
        last = EMAScorer(model, layers="last")(images)
        torch.testing.assert_close(last, out.attentions[-1][:, :, 0, 1:].mean(1), atol=ATOL, rtol=0)


def _probe_weights(tower, inputs):
    """The SigLIP head's own nn.MultiheadAttention weights [B, H, 1, N] (need_weights=True)."""
    got = []
    attn = tower.head.attention
    pre = attn.register_forward_pre_hook(
        lambda m, a, kw: (a, dict(kw, need_weights=True, average_attn_weights=False)), with_kwargs=True)
    post = attn.register_forward_hook(lambda m, a, out: got.append(out[1]))
    try:
        tower(**inputs)
    finally:
        pre.remove(), post.remove()
    return got[0]


@pytest.mark.parametrize("name", ["SiglipVisionModel", "SiglipModel", "Siglip2VisionModel", "Siglip2Model"])
def test_siglip_scorer_matches_the_probe_and_the_mean_query_rule(name):
    model = patch_hf_clip(_build(name))
    tower = _tower(model)
    images = torch.randn(3, 3, SIZE, SIZE)
    inputs = {k: v for k, v in _inputs(tower, images).items() if k != "input_ids"}
    scorer = EMAScorer(make_ema(model))
    assert scorer.source == "probe"
    probe = scorer(images)
    weights = _probe_weights(_tower(_eager(model)), inputs)
    torch.testing.assert_close(probe, weights[:, :, 0].mean(1), atol=ATOL, rtol=0)
    # the rule from the eager maps needs log(attn) finite: HF's eager softmax runs in fp32, so the
    # sharpened model's maps underflow to 0; the unsharpened one's do not
    soft = patch_hf_clip(_build(name, sharpen=1.0))
    with torch.no_grad():
        maps = _tower(_eager(soft))(**inputs, output_attentions=True).attentions
    assert min(float(a.min()) for a in maps) > 0
    rule = torch.stack([mean_query_attention_ref(a) for a in maps]).mean(0)
    torch.testing.assert_close(EMAScorer(soft, source="mean-query")(images), rule, atol=ATOL, rtol=0)
    rule = EMAScorer(model, source="mean-query")(images)
    torch.testing.assert_close(EMAScorer(model, source="probe+mean-query")(images), (probe + rule) / 2,
                               atol=ATOL, rtol=0)
    with pytest.raises(ValueError, match="no \\[CLS\\] token"):
        EMAScorer(model, source="cls")


def test_scorer_micro_batch_joins_model_outputs():
    model = _build("SiglipVisionModel")
    images = torch.randn(3, 3, SIZE, SIZE)
    full, scores = EMAScorer(model).forward_with_output(images)
    split, split_scores = EMAScorer(model, micro_batch=2).forward_with_output(images)
    assert type(split) is type(full)
    torch.testing.assert_close(split.pooler_output, full.pooler_output)
    torch.testing.assert_close(split_scores, scores, atol=ATOL, rtol=0)


def test_ema_copy_masks_itself_only():
    model = patch_hf_clip(_build("CLIPVisionModel")).train()
    ema = make_ema(model).train()
    images, scores = torch.randn(2, 3, SIZE, SIZE), torch.rand(2, GRID * GRID)
    with masking(ema, scores=scores, keep=4) as state:
        masked = ema(pixel_values=images).last_hidden_state
        full = model(pixel_values=images).last_hidden_state      # not inside its own masking block
    assert masked.shape[1] == 1 + 4 and full.shape[1] == 1 + GRID * GRID and state.calls == 1


def test_siglip2_inputs_match_the_image_processor():
    processor = transformers.Siglip2ImageProcessor(patch_size=PATCH, max_num_patches=GRID * GRID, do_resize=False,
                                                   do_rescale=False, do_normalize=False)
    image = torch.rand(3, SIZE, SIZE)
    out = processor(images=[image], return_tensors="pt")
    mine = siglip2_inputs(image[None], PATCH)
    torch.testing.assert_close(mine["pixel_values"], out["pixel_values"].to(torch.float32))
    assert mine["spatial_shapes"].tolist() == out["spatial_shapes"].tolist()


def test_siglip2_refuses_padded_or_mixed_batches_inside_masking():
    model = patch_hf_clip(_build("Siglip2VisionModel")).train()
    inputs = siglip2_inputs(torch.randn(2, 3, SIZE, SIZE), PATCH)
    inputs["pixel_attention_mask"][1, -8:] = 0                        # the second image is padded
    with masking(model, scores=torch.rand(2, GRID * GRID), keep=4):
        with pytest.raises(ValueError, match="one patch grid for the whole batch and no padding"):
            model(**inputs)
    model(**inputs)                                                   # outside masking: the model's own path
    inputs = siglip2_inputs(torch.randn(2, 3, SIZE, SIZE), PATCH)
    inputs["spatial_shapes"][1] = torch.tensor([4, 16])
    with masking(model, scores=torch.rand(2, GRID * GRID), keep=4):
        with pytest.raises(ValueError, match="spatial_shapes"):
            model(**inputs)


def test_bad_models_and_attention_backends_are_refused():
    with pytest.raises(TypeError, match="transformers CLIP / SigLIP"):
        patch_hf_clip(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="attn='sdpa'"):
        EMAScorer(_build("CLIPVisionModel"), attn="xformers")


@pytest.mark.parametrize("script, tokens", [("hf_clip_aclip.py", 101), ("hf_siglip_aclip.py", 100)])
def test_examples_run_one_aclip_step(script, tokens, capsys):
    """examples/hf_*_aclip.py: one step (offline, random weights); the masked views' token count."""
    pytest.importorskip("tokenizers")
    runpy.run_path(str(pathlib.Path(__file__).parents[2] / "examples" / script), run_name="__main__")
    out = capsys.readouterr().out
    loss = float(re.search(r"loss (\S+),", out)[1])
    assert math.isfinite(loss) and f"tokens per view {tokens} " in out and "scores (2, 196) on grid (14, 14)" in out


def test_crop_views_crops_each_view_from_its_image():
    images = torch.arange(2 * 8 * 8, dtype=torch.float32).view(2, 1, 8, 8)
    boxes = torch.tensor([[0.25, 0.5, 0.5, 0.5], [0.0, 0.0, 1.0, 1.0], [0.0, 0.0, 1.0, 1.0]])
    views = crop_views(images, boxes, 4)                              # rows 0, 2 crop image 0; row 1 image 1
    assert torch.equal(views[0], images[0, :, 2:6, 4:8])              # same pixel size: an exact crop
    torch.testing.assert_close(views[1], F.avg_pool2d(images[1], 2))  # 2x down: bilinear at the cell centres
    torch.testing.assert_close(views[2], F.avg_pool2d(images[0], 2))


@pytest.mark.parametrize("name", ["CLIPVisionModel", "Siglip2VisionModel"])
def test_scorer_at_reduced_resolution_interpolates_the_position_embeddings(name):
    model = _build(name)
    images = torch.randn(2, 3, SIZE, SIZE)
    scorer = EMAScorer(model, resolution=SIZE // 2)                   # the "efficient" A-CLIP EMA
    scores = scorer(images)
    assert scorer.grid == (GRID // 2, GRID // 2) and scores.shape == (2, GRID * GRID // 4)
    small = F.interpolate(images, size=SIZE // 2, mode="bilinear", align_corners=False, antialias=True)
    inputs = siglip2_inputs(small, PATCH) if "Siglip2" in name else {"pixel_values": small, "interpolate_pos_encoding": True}
    if "CLIP" in name:
        maps = _eager(model)(**inputs, output_attentions=True).attentions
        torch.testing.assert_close(scores, torch.stack(maps).mean(0)[:, :, 0, 1:].mean(1), atol=ATOL, rtol=0)
    else:
        torch.testing.assert_close(scores, _probe_weights(_eager(model), inputs)[:, :, 0].mean(1), atol=ATOL, rtol=0)


@pytest.mark.parametrize("name", ["CLIPVisionModel", "SiglipVisionModel", "Siglip2VisionModel"])
def test_masked_forward_trains(name):
    model = patch_hf_clip(_build(name)).train()
    ema = make_ema(model)
    images, boxes = torch.randn(4, 3, SIZE, SIZE), torch.tensor([[0.0, 0.0, 1.0, 1.0], [0.25, 0.25, 0.5, 0.5]] * 2)
    scores = EMAScorer(ema)(images[:2])
    with masking(model, scores=scores, boxes=boxes, keep=0.5, block=2) as state:
        pooled = model(**_inputs(model, images)).pooler_output
    pooled.square().mean().backward()
    grad = model.embeddings.patch_embedding.weight.grad
    assert state.tokens == model.aclip_patch_dropout.num_prefix_tokens + 32
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0


def test_explicit_scores_point_transformers_users_to_eager_maps():
    from aclip_kernels.integrations.explicit import explicit_attention_scores
    with pytest.raises(TypeError, match="output_attentions=True"):
        explicit_attention_scores(_build("CLIPVisionModel"), torch.randn(1, 3, SIZE, SIZE))

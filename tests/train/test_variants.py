"""TrainModel.set_variant (the masking-ablation variants of the aclip forward): 1 or 2 online views,
attentive / random / no mask, full or CLIP-only loss. The default is A-CLIP as published and its
forward is unchanged."""
import pytest
import torch

from aclip_kernels.integrations import EMAScorer, make_ema, patch_open_clip
from aclip_kernels.train import losses
from aclip_kernels.train.model import TrainModel, build_clip


def _setup(seed=0, b=4):
    torch.manual_seed(seed)
    clip, tok = build_clip("ACLIP-Test")
    model = TrainModel(clip, "aclip", ssl_dim=16, ssl_hidden=32)
    ema = make_ema(model.ema_source())
    scorer = EMAScorer(ema.visual)
    patch_open_clip(clip)
    g = torch.Generator().manual_seed(1)
    batch = {"view1": torch.randn(b, 3, 16, 16, generator=g), "view2": torch.randn(b, 3, 16, 16, generator=g),
             "ema": torch.randn(b, 3, 16, 16, generator=g), "text": tok(["a", "b", "c", "d"][:b]),
             "boxes": torch.tensor([[0.0, 0.0, 0.7, 0.8]] * b + [[0.2, 0.1, 0.8, 0.9]] * b)}
    with torch.no_grad():
        feats, scores = scorer.forward_with_output(batch["ema"])
        target = ema.projector(feats)
    return model, batch, scores.float(), target


def _tokens_seen(model):
    seen = []
    module = model.clip.visual.patch_dropout
    handle = module.register_forward_hook(lambda m, i, o: seen.append(tuple(o.shape)))
    return seen, handle


def test_default_is_aclip_and_the_variant_path_agrees_with_it():
    model, batch, scores, target = _setup()
    assert (model.views, model.mask, model.loss) == (2, "attentive", "full") and model.needs_ema()
    default = model(batch, scores, target)
    text = model._text(batch["text"])
    variant = model._variant_forward(batch, scores, target, text, model.clip.logit_scale.exp())
    assert set(default) == set(variant) == {"clip1", "clip2", "simclr", "byol", "loss"}
    for k in default:
        torch.testing.assert_close(variant[k], default[k])


@pytest.mark.parametrize("views,mask,kept", [(1, "attentive", 1 + 8), (1, "random", 1 + 8), (2, "random", 1 + 8),
                                             (1, "none", 1 + 16), (2, "none", 1 + 16)])
def test_clip_only_variants(views, mask, kept):
    model, batch, scores, target = _setup()
    model.set_variant(views, mask, "clip")
    assert model.needs_ema() == (mask == "attentive")
    seen, handle = _tokens_seen(model)
    out = model(batch, scores if mask == "attentive" else None, None)
    handle.remove()
    assert set(out) == {"loss"} | {f"clip{i + 1}" for i in range(views)}
    torch.testing.assert_close(out["loss"], sum(out[f"clip{i + 1}"] for i in range(views)) / views)
    assert seen == [(views * 4, kept, 32)]             # 16 patches of ACLIP-Test, 2x2 blocks, keep 50%
    out["loss"].backward()
    assert model.clip.visual.conv1.weight.grad is not None
    assert model.simclr_head[0].weight.grad is None and model.byol_predictor[0].weight.grad is None


def test_one_view_attentive_clip_only_is_the_masked_clip_loss_of_view1():
    import torch.nn.functional as F
    from aclip_kernels.integrations import masking
    model, batch, scores, _ = _setup()
    model.set_variant(1, "attentive", "clip")
    out = model(batch, scores, None)
    with masking(model.clip, scores=scores, boxes=batch["boxes"][:4], keep=0.5, block=2):
        image = model.clip.encode_image(batch["view1"])
    ref = losses.clip_loss(F.normalize(image, dim=-1), model._text(batch["text"]), model.clip.logit_scale.exp())
    torch.testing.assert_close(out["loss"], ref)


def test_full_loss_one_view_is_clip_plus_byol():
    model, batch, scores, target = _setup()
    model.set_variant(1, "random", "full")
    assert model.needs_ema()
    out = model(batch, None, target)
    assert set(out) == {"clip1", "byol", "loss"}
    torch.testing.assert_close(out["loss"], out["clip1"] + 2 * out["byol"])


def test_bad_variants_raise():
    model, *_ = _setup()
    with pytest.raises(ValueError, match="views"):
        model.set_variant(3, "attentive", "clip")
    with pytest.raises(ValueError, match="mask"):
        model.set_variant(1, "block", "clip")
    clip, _ = build_clip("ACLIP-Test")
    with pytest.raises(ValueError, match="aclip"):
        TrainModel(clip, "clip", views=1, mask="none", loss="clip")
    assert not TrainModel(clip, "clip").needs_ema()

"""Drop-in masking: patched open_clip ViT-B-16 and timm ViTs train one step with attentive and random
masking (finite loss, gradients reach the patch embedding, the blocks see the configured token
count); outside a masking block the module is the PatchDropout it replaced; eval keeps every token."""
import copy

import pytest
import torch
import torch.nn.functional as F

import aclip_kernels
from aclip_kernels import (AttentivePatchDropout, AttentivePatchDropoutWithIndices, EMAScorer, make_ema, masking,
                           patch_open_clip, patch_timm_vit)
from aclip_kernels.testing import random_boxes

timm = pytest.importorskip("timm")
open_clip = pytest.importorskip("open_clip")

BS, VIEWS = 2, 2


class TokenCount:
    """A forward pre-hook on the first block: the token count the blocks see."""

    def __init__(self, block):
        self.seen = []
        self.handle = block.register_forward_pre_hook(lambda m, args: self.seen.append(args[0].shape[1]))


def _views(seed=0, rows=VIEWS * BS):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rows, 3, 224, 224, generator=g), random_boxes(rows, g)


@pytest.fixture(scope="module")
def clip_model():
    torch.manual_seed(0)
    return open_clip.create_model("ViT-B-16", pretrained=None)


def test_open_clip_vit_b16_trains_one_step_with_attentive_masking(clip_model):
    model = patch_open_clip(copy.deepcopy(clip_model)).train()
    assert isinstance(model.visual.patch_dropout, AttentivePatchDropout)
    ema = make_ema(model)
    scorer = EMAScorer(ema)
    tokenizer = open_clip.get_tokenizer("ViT-B-16")
    images, boxes = _views()
    ema_images = torch.randn(BS, 3, 224, 224)
    counter = TokenCount(model.visual.transformer.resblocks[0])
    ema_out, scores = scorer.forward_with_output(ema_images)           # [BS, 512], [BS, 196]
    assert ema_out.shape == (BS, 512) and scores.shape == (BS, 196)

    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    with masking(model, scores=scores, boxes=boxes, keep=0.5, block=2) as state:
        image_features = model.encode_image(images, normalize=True)    # [V*BS, 512]
    text_features = model.encode_text(tokenizer(["a photo of a cat", "a dog"]), normalize=True)
    logits = model.logit_scale.exp() * image_features.view(VIEWS, BS, -1) @ text_features.T
    labels = torch.arange(BS)
    loss = sum(F.cross_entropy(lg, labels) + F.cross_entropy(lg.T, labels) for lg in logits) / (2 * VIEWS)
    loss.backward()
    assert torch.isfinite(loss)
    grad = model.visual.conv1.weight.grad
    assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0
    opt.step()
    assert counter.seen == [1 + 100]                                   # 25 of 49 2x2 blocks
    assert state.calls == 1 and state.tokens == 101 and state.indices.shape == (VIEWS * BS, 100)
    assert model.visual.patch_dropout._masking is None                 # nothing survives the step

    # random (FLIP) mode through the same patched model
    with torch.no_grad(), masking(model.visual, mode="random", keep=0.5, block=1,
                                  generator=torch.Generator().manual_seed(0)) as state:
        model.encode_image(images)
    assert counter.seen[-1] == 1 + 98 and state.indices.shape == (VIEWS * BS, 98)
    counter.handle.remove()


def test_open_clip_eval_and_fallback_equal_the_unpatched_model(clip_model):
    images, _ = _views(seed=1, rows=2)
    torch.manual_seed(1)
    reference = open_clip.create_model("ViT-B-16", pretrained=None, force_patch_dropout=0.5).visual
    patched = patch_open_clip(copy.deepcopy(reference))
    assert patched.patch_dropout.prob == 0.5 and patched.patch_dropout.num_prefix_tokens == 1
    with torch.no_grad():
        reference.eval(), patched.eval()
        assert torch.equal(patched(images), reference(images))
        scores = torch.rand(2, 196)
        with masking(patched, scores=scores, keep=0.25):               # eval keeps every token
            assert torch.equal(patched(images), reference(images))
        reference.train(), patched.train()
        torch.manual_seed(5)
        expected = reference(images)
        torch.manual_seed(5)
        assert torch.equal(patched(images), expected)                  # the same random dropout
    # prob 0 (ViT-B-16 as created): identity outside a masking block, also in training mode
    plain = patch_open_clip(copy.deepcopy(clip_model.visual)).train()
    with torch.no_grad():
        assert torch.equal(plain(images), clip_model.visual.train()(images))
    clip_model.eval()


@pytest.mark.parametrize("reg_tokens", [0, 4])
def test_timm_vit_trains_one_step_with_attentive_masking(reg_tokens):
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, reg_tokens=reg_tokens, num_classes=10)
    prefix = 1 + reg_tokens
    model = patch_timm_vit(model).train()
    assert model.patch_drop.num_prefix_tokens == prefix and model.patch_drop.grid == (14, 14)
    scores = EMAScorer(make_ema(model))(torch.randn(BS, 3, 224, 224))
    images, boxes = _views(seed=2)
    counter = TokenCount(model.blocks[0])
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    with masking(model, scores=scores, boxes=boxes, keep=0.5, block=2):
        loss = F.cross_entropy(model(images), torch.arange(VIEWS * BS) % 10)
    loss.backward()
    assert torch.isfinite(loss)
    grad = model.patch_embed.proj.weight.grad
    assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0
    opt.step()
    assert counter.seen == [prefix + 100]
    with masking(model, mode="random", keep=49, block=1):              # an int keep: 49 patches
        model(images)
    assert counter.seen[-1] == prefix + 49
    counter.handle.remove()


def test_timm_eval_and_fallback_equal_the_unpatched_model():
    torch.manual_seed(0)
    reference = timm.create_model("vit_tiny_patch16_224", pretrained=False, patch_drop_rate=0.5)
    patched = patch_timm_vit(copy.deepcopy(reference))
    assert patch_timm_vit(patched) is patched                           # idempotent
    images, _ = _views(seed=3, rows=2)
    with torch.no_grad():
        reference.eval(), patched.eval()
        assert torch.equal(patched(images), reference(images))
        reference.train(), patched.train()
        torch.manual_seed(7)
        expected = reference(images)
        torch.manual_seed(7)
        assert torch.equal(patched(images), expected)


def test_module_signatures_and_context_errors():
    x = torch.randn(2, 1 + 16, 8)
    timm_like = AttentivePatchDropoutWithIndices(0.5, num_prefix_tokens=1).train()
    out, idx = timm_like(x)
    assert out.shape == (2, 1 + 8, 8) and idx.shape == (2, 8)
    assert timm_like.eval()(x)[1] is None and torch.equal(timm_like(x)[0], x)
    oc = AttentivePatchDropout(0.5, exclude_first_token=False).train()
    assert oc.num_prefix_tokens == 0 and oc(x).shape == (2, 8, 8)
    module = torch.nn.Sequential(AttentivePatchDropout()).train()
    scores = torch.rand(2, 4, 4)
    with masking(module, scores=scores, keep=4, block=2) as state:
        kept = module(x)
    assert kept.shape == (2, 1 + 16, 8) and state.indices.shape == (2, 16)
    with pytest.raises(RuntimeError):
        with masking(module, scores=scores, keep=0.5):
            raise RuntimeError("step failed")
    assert module[0]._masking is None                                  # detached on errors too
    with pytest.raises(ValueError, match="patch it first"):
        with masking(torch.nn.Linear(2, 2), scores=scores):
            pass
    with pytest.raises(ValueError, match="needs scores"):
        with masking(module):
            pass
    with pytest.raises(ValueError, match="mode"):
        with masking(module, mode="magic"):
            pass
    with pytest.raises(TypeError):
        patch_timm_vit(torch.nn.Linear(2, 2))
    assert aclip_kernels.masking is masking

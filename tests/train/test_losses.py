"""Reference training loop: losses (CLIP, SimCLR between two different views, BYOL)."""
import math

import pytest
import torch
import torch.nn.functional as F

from aclip_kernels.train import losses


def test_clip_loss_matches_a_direct_computation():
    g = torch.Generator().manual_seed(0)
    img = F.normalize(torch.randn(6, 8, generator=g), dim=-1)
    txt = F.normalize(torch.randn(6, 8, generator=g), dim=-1)
    logits = 10 * img @ txt.t()
    want = (F.cross_entropy(logits, torch.arange(6)) + F.cross_entropy(logits.t(), torch.arange(6))) / 2
    torch.testing.assert_close(losses.clip_loss(img, txt, torch.tensor(10.0)), want)


def test_simclr_needs_two_views_and_matches_nt_xent():
    g = torch.Generator().manual_seed(1)
    z1, z2 = torch.randn(5, 4, generator=g), torch.randn(5, 4, generator=g)
    with pytest.raises(ValueError, match="two different views"):
        losses.simclr_loss(z1, z1)
    # NT-Xent over the 2b rows, self-similarity excluded
    z = F.normalize(torch.cat([z1, z2]), dim=-1)
    sim = z @ z.t() / 0.1
    sim.fill_diagonal_(float("-inf"))
    target = torch.cat([torch.arange(5, 10), torch.arange(5)])
    torch.testing.assert_close(losses.simclr_loss(z1, z2, 0.1), F.cross_entropy(sim, target))
    # the published defect (view 1 against itself) makes the positive trivial: a far lower loss
    assert losses.simclr_loss(z1, z1.clone()) < losses.simclr_loss(z1, z2)


def test_byol_loss():
    p = torch.randn(4, 6, requires_grad=True)
    t = torch.randn(4, 6, requires_grad=True)
    assert math.isclose(float(losses.byol_loss(p, p.detach()).detach()), 0.0, abs_tol=1e-6)
    losses.byol_loss(p, t).backward()
    assert p.grad is not None and t.grad is None


def test_aclip_forward_feeds_simclr_the_two_online_views(monkeypatch):
    from aclip_kernels.integrations import make_ema, patch_open_clip, EMAScorer
    from aclip_kernels.train.model import TrainModel, build_clip
    torch.manual_seed(0)
    clip, tok = build_clip("ACLIP-Test")
    model = TrainModel(clip, "aclip", ssl_dim=16, ssl_hidden=32)
    ema = make_ema(model.ema_source())
    patch_open_clip(clip)
    seen = []
    real = losses.simclr_loss
    monkeypatch.setattr(losses, "simclr_loss", lambda z1, z2, tau: seen.append((z1, z2)) or real(z1, z2, tau))
    b = 3
    view1, view2 = torch.randn(b, 3, 16, 16), torch.randn(b, 3, 16, 16)
    feats, scores = EMAScorer(ema.visual).forward_with_output(torch.randn(b, 3, 16, 16))
    batch = {"view1": view1, "view2": view2, "text": tok(["a", "b", "c"]),
             "boxes": torch.tensor([[0.0, 0.0, 1.0, 1.0]] * (2 * b))}
    out = model(batch, scores, ema.projector(feats))
    assert set(out) == {"clip1", "clip2", "simclr", "byol", "loss"}
    (z1, z2), = seen
    assert z1.shape == z2.shape == (b, 16) and not torch.allclose(z1, z2)
    # z2 is view 2's embedding: swapping the views swaps the SimCLR inputs
    seen.clear()
    model({**batch, "view1": view2, "view2": view1}, scores, ema.projector(feats))
    torch.testing.assert_close(seen[0][0], z2)
    torch.testing.assert_close(seen[0][1], z1)

"""Reference training loop: A-CLIP's three-crop augmentation and its boxes."""
import torch
import torch.nn.functional as F

from aclip_kernels.train.augment import (MEAN, STD, ThreeCrop, box_in_frame, crop_resize,
                                         random_resized_crop_box, union_box)


def test_union_box_contains_both_crops_and_fixes_the_published_defect():
    a, b = (10, 40, 20, 30), (25, 5, 50, 20)          # (top, left, h, w); view 2 is left of view 1
    u = union_box(a, b)
    assert u == (10, 5, 65, 65)
    # the published left edge, min(left1, height2) = min(40, 50) = 40, would cut view 2 off
    assert min(a[1], b[2]) > b[1]
    g = torch.Generator().manual_seed(0)
    for _ in range(200):
        a = random_resized_crop_box(48, 64, g, (0.5, 1.0))
        b = random_resized_crop_box(48, 64, g, (0.5, 1.0))
        u = union_box(a, b)
        for box in (a, b):
            y0, x0, h, w = box_in_frame(box, u)
            assert 0 <= y0 and 0 <= x0 and y0 + h <= 1 + 1e-9 and x0 + w <= 1 + 1e-9
        assert 0 <= u[0] and 0 <= u[1] and u[0] + u[2] <= 48 and u[1] + u[3] <= 64


def _ramp(h, w):
    y = torch.linspace(0, 1, h)[:, None].expand(h, w)
    x = torch.linspace(0, 1, w)[None].expand(h, w)
    return torch.stack([y, x, 0.5 * (x + y)])


def test_three_crop_boxes_map_online_views_into_the_ema_view():
    img = _ramp(96, 128)
    t = ThreeCrop(32)
    mean, std = torch.tensor(MEAN)[:, None, None], torch.tensor(STD)[:, None, None]
    for seed in range(5):
        out = t(img, torch.Generator().manual_seed(seed))
        assert out["view1"].shape == (3, 32, 32) and out["ema"].shape == (3, 32, 32)
        assert out["boxes"].shape == (2, 4) and out["boxes"].dtype == torch.float32
        b1, b2, u = [tuple(c) for c in out["crops"].tolist()]
        assert union_box(b1, b2) == u
        ema = out["ema"] * std + mean
        for v, box in enumerate((b1, b2)):
            y0, x0, h, w = out["boxes"][v].tolist()
            # sampling the EMA view at the normalised box gives the online crop (before colour aug)
            ys = (y0 + (torch.arange(32) + 0.5) / 32 * h) * 2 - 1
            xs = (x0 + (torch.arange(32) + 0.5) / 32 * w) * 2 - 1
            grid = torch.stack(torch.meshgrid(xs, ys, indexing="xy"), -1)[None]
            sampled = F.grid_sample(ema[None], grid, align_corners=False, padding_mode="border")[0]
            direct = crop_resize(img, box, 32)
            assert (sampled - direct).abs().max() < 0.05, (seed, v)


def test_three_crop_is_deterministic_per_generator_and_views_differ():
    img = torch.rand(3, 40, 40)
    a = ThreeCrop(16)(img, torch.Generator().manual_seed(7))
    b = ThreeCrop(16)(img, torch.Generator().manual_seed(7))
    for k in a:
        torch.testing.assert_close(a[k], b[k])
    assert not torch.equal(a["view1"], a["view2"])

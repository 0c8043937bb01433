"""Reference training loop: A-CLIP's three-crop augmentation and its boxes.

The EMA crop is the published random zoom-out (microsoft/A-CLIP ``datasets.py``,
``GetThreeRandomResizedCrop.forward``) with its two defects fixed: it contains both online views in
every draw, and its area distribution stays near the published one (10,000 draws, 64 x 64 image,
scale 0.5-1, mean EMA crop area / image area): published 0.871 (q05 0.712, median 0.879),
corrected 0.919 (q05 0.806, median 0.938), tight union 0.842 (q05 0.686, median 0.849); the
published crop misses part of a view in 60% of the draws, 39% with only its left edge fixed.
"""
import pytest
import torch

from aclip_kernels.reference import align_scores_ref
from aclip_kernels.train.augment import (MEAN, STD, ThreeCrop, box_in_frame, crop_resize,
                                         make_transform, random_resized_crop_box, union_box, zoom_out_box)

DRAWS = 10_000


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


def _published_zoom_out(ret1, ret2, height, width, g, fix_left=False):
    """The published EMA crop, as ``GetThreeRandomResizedCrop.forward`` computes it (microsoft/A-CLIP
    ``datasets.py``), its defects kept: the left edge min(left1, height2) (unless ``fix_left``), and
    the height and width drawn from the extent measured before the top and left move. Draws from
    ``g`` in the published order."""
    def randint(lo, hi):
        return torch.randint(lo, hi, size=(1,), generator=g).item()
    ret3 = [0, 0, 0, 0]
    ret3[0], ret3[1] = min(ret1[0], ret2[0]), min(ret1[1], ret2[1] if fix_left else ret2[2])
    rh = max(ret1[0] + ret1[2], ret2[0] + ret2[2])
    rw = max(ret1[1] + ret1[3], ret2[1] + ret2[3])
    ret3[2], ret3[3] = rh - ret3[0], rw - ret3[1]
    ret3[0] = randint(0, ret3[0] + 1) if ret3[0] > 0 else ret3[0]
    ret3[1] = randint(0, ret3[1] + 1) if ret3[1] > 0 else ret3[1]
    ret3[2] = randint(ret3[2], height - ret3[0] + 1) if ret3[2] < height else ret3[2]
    ret3[3] = randint(ret3[3], width - ret3[1] + 1) if ret3[3] < width else ret3[3]
    return tuple(ret3)


def _contains(outer, box):
    return (outer[0] <= box[0] and outer[1] <= box[1] and box[0] + box[2] <= outer[0] + outer[2]
            and box[1] + box[3] <= outer[1] + outer[3])


@pytest.mark.parametrize("height,width", [(64, 64), (48, 80)])
def test_zoom_out_contains_both_views_and_keeps_the_published_scale(height, width):
    g = torch.Generator().manual_seed(0)
    area = {"published": [], "zoom": [], "union": []}
    misses = {"published": 0, "left fixed": 0, "zoom": 0}
    for _ in range(DRAWS):
        a = random_resized_crop_box(height, width, g)
        b = random_resized_crop_box(height, width, g)
        crops = {"published": _published_zoom_out(a, b, height, width, g),
                 "left fixed": _published_zoom_out(a, b, height, width, g, fix_left=True),
                 "zoom": zoom_out_box(a, b, height, width, g), "union": union_box(a, b)}
        for name, c in crops.items():
            if name in misses:
                misses[name] += not (_contains(c, a) and _contains(c, b))
            if name in area:
                area[name].append(c[2] * c[3] / (height * width))
        z = crops["zoom"]
        assert 0 <= z[0] and 0 <= z[1] and z[0] + z[2] <= height and z[1] + z[3] <= width
    assert misses["zoom"] == 0                                       # 100% of 10,000 draws
    assert misses["published"] > 0.3 * DRAWS and misses["left fixed"] > 0.2 * DRAWS
    area = {k: torch.tensor(v) for k, v in area.items()}
    q = torch.tensor([0.05, 0.5, 0.95])
    published, zoom, union = (torch.quantile(area[k], q) for k in ("published", "zoom", "union"))
    # the fix only lets the crop reach the views it missed: a little larger than published, never
    # the tight union's distribution
    assert 0 < area["zoom"].mean() - area["published"].mean() < 0.08
    assert area["union"].mean() < area["published"].mean() - 0.02
    assert ((zoom - published).abs() < 0.15).all() and (union < zoom).all()


@pytest.mark.parametrize("ema_crop", ["zoom", "union"])
def test_three_crop_boxes_map_online_views_into_the_ema_view(ema_crop):
    """attentive_mask's box alignment (align_scores_ref), given a map of the EMA view, samples
    the online crop: each box points at its own view inside the EMA crop."""
    img = _ramp(96, 128)
    t = ThreeCrop(32, ema_crop=ema_crop)
    mean, std = torch.tensor(MEAN)[:, None, None], torch.tensor(STD)[:, None, None]
    for seed in range(5):
        out = t(img, torch.Generator().manual_seed(seed))
        assert out["view1"].shape == (3, 32, 32) and out["ema"].shape == (3, 32, 32)
        assert out["boxes"].shape == (2, 4) and out["boxes"].dtype == torch.float32
        b1, b2, u = [tuple(c) for c in out["crops"].tolist()]
        assert _contains(u, b1) and _contains(u, b2)
        if ema_crop == "union":
            assert union_box(b1, b2) == u
        ema = out["ema"] * std + mean                                # [3, 32, 32], as a score map per channel
        for v, box in enumerate((b1, b2)):
            direct = crop_resize(img, box, 32)                       # the online crop before colour aug
            own, other = ((align_scores_ref(ema, out["boxes"][i].expand(3, 4), (32, 32)) - direct).abs().max()
                          for i in (v, 1 - v))
            assert own < 0.05 and own <= other, (seed, v)


def test_three_crop_is_deterministic_per_generator_and_views_differ():
    img = torch.rand(3, 40, 40)
    a = ThreeCrop(16)(img, torch.Generator().manual_seed(7))
    b = ThreeCrop(16)(img, torch.Generator().manual_seed(7))
    with pytest.raises(ValueError, match="ema_crop"):
        ThreeCrop(16, ema_crop="tight")
    assert make_transform("aclip", 16).ema_crop == "zoom"
    assert make_transform("aclip-eff", 16, "union").ema_crop == "union"
    for k in a:
        torch.testing.assert_close(a[k], b[k])
    assert not torch.equal(a["view1"], a["view2"])

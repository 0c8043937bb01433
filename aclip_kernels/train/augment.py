"""Augmentations, including A-CLIP's three-crop view, with explicit per-sample random generators.

All transforms take a float image tensor [3, H, W] in 0..1 and a ``torch.Generator``; the loop seeds
one generator per (seed, epoch, sample), so a sample's views do not depend on the rank, the worker
or whether the run was resumed.

The three-crop augmentation (``ThreeCrop``): two online crops, each RandomResizedCrop(scale 0.5-1,
ratio 3/4-4/3) to ``size`` with colour jitter / grayscale / blur / solarize, and the EMA crop,
resized to ``ema_size`` and only normalised. The EMA crop is by default the published A-CLIP one
(``GetThreeRandomResizedCrop`` in microsoft/A-CLIP ``datasets.py``): a random zoom-out of the union
of the two online crops (``zoom_out_box``); ``ema_crop="union"`` takes the tight union itself. It
returns each online crop's box inside the EMA crop in the ``attentive_mask`` convention:
(y0, x0, h, w) normalised to the EMA crop (0..1).

The published zoom-out has two defects, fixed here, so that the EMA crop always contains both views
(tested over 10,000 draws):
1. the union's left edge is ``min(left1, height2)`` (a left coordinate mixed with a height): the
   crop misses view 2 whenever ``height2 > left2``. Here it is ``min(left1, left2)``.
2. after the top and left are redrawn in [0, top] and [0, left], the height and width are drawn
   from [h_union, H - top'] and [w_union, W - left'], with h_union and w_union measured from the
   old top and left: the crop ends above the views' bottom or left of their right edge whenever
   the edge moved. Here they are drawn from [bottom - top', H - top'] and [right - left', W - left'].
"""
from __future__ import annotations

import math
from typing import Dict, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.transforms.v2 import functional as TF

__all__ = ["MEAN", "STD", "EMA_CROPS", "normalize", "random_resized_crop_box", "union_box", "zoom_out_box",
           "box_in_frame",
           "crop_resize", "color_augment", "to_tensor", "EvalTransform", "SingleView", "ThreeCrop", "SlipViews",
           "make_transform"]

# open_clip's OPENAI_DATASET_MEAN / STD
MEAN = (0.48145466, 0.4578275, 0.40821073)
STD = (0.26862954, 0.26130258, 0.27577711)

Box = Tuple[int, int, int, int]  # (top, left, height, width) in source pixels
EMA_CROPS = ("zoom", "union")    # ThreeCrop's EMA crop: the published random zoom-out (fixed), the tight union


def normalize(img: Tensor) -> Tensor:
    return TF.normalize(img, list(MEAN), list(STD))


def _uniform(g: torch.Generator, lo: float, hi: float) -> float:
    return lo + (hi - lo) * torch.rand((), generator=g).item()


def random_resized_crop_box(height: int, width: int, g: torch.Generator, scale=(0.5, 1.0),
                            ratio=(3 / 4, 4 / 3)) -> Box:
    """torchvision's RandomResizedCrop.get_params, drawing from ``g``: (top, left, h, w)."""
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * _uniform(g, *scale)
        aspect = math.exp(_uniform(g, *log_ratio))
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(torch.randint(0, height - h + 1, (), generator=g))
            left = int(torch.randint(0, width - w + 1, (), generator=g))
            return top, left, h, w
    in_ratio = width / height               # fallback: central crop, as torchvision
    if in_ratio < ratio[0]:
        w, h = width, int(round(width / ratio[0]))
    elif in_ratio > ratio[1]:
        h, w = height, int(round(height * ratio[1]))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def union_box(a: Box, b: Box) -> Box:
    """The smallest (top, left, h, w) box containing boxes a and b (the published defect fixed)."""
    top, left = min(a[0], b[0]), min(a[1], b[1])
    bottom, right = max(a[0] + a[2], b[0] + b[2]), max(a[1] + a[3], b[1] + b[3])
    return top, left, bottom - top, right - left


def _randint(g: torch.Generator, lo: int, hi: int) -> int:
    """Uniform integer in [lo, hi], bounds included."""
    return int(torch.randint(lo, hi + 1, (), generator=g))


def zoom_out_box(a: Box, b: Box, height: int, width: int, g: torch.Generator) -> Box:
    """A-CLIP's EMA crop, the published zoom-out with both defects fixed: the union of boxes a and b
    (top, left, bottom, right), then top' uniform in [0, top], left' in [0, left], h in
    [bottom - top', height - top'], w in [right - left', width - left'] (integers). Contains a and b,
    inside the height x width image. Returns (top', left', h, w)."""
    top, left, h, w = union_box(a, b)
    bottom, right = top + h, left + w
    top, left = _randint(g, 0, top), _randint(g, 0, left)
    return top, left, _randint(g, bottom - top, height - top), _randint(g, right - left, width - left)


def box_in_frame(box: Box, frame: Box) -> Tuple[float, float, float, float]:
    """``box`` as (y0, x0, h, w) normalised to ``frame`` (both (top, left, h, w) in pixels)."""
    return ((box[0] - frame[0]) / frame[2], (box[1] - frame[1]) / frame[3],
            box[2] / frame[2], box[3] / frame[3])


def crop_resize(img: Tensor, box: Box, size: int) -> Tensor:
    """Crop (top, left, h, w) from [3, H, W] and resize to [3, size, size] (bilinear, antialiased)."""
    return TF.resized_crop(img, box[0], box[1], box[2], box[3], [size, size], antialias=True)


def gaussian_blur(img: Tensor, kernel: int, sigma: float) -> Tensor:
    """Separable Gaussian blur of [C, H, W] (odd ``kernel``, reflect padding), as shifted weighted
    sums: on small images this stays single-threaded and far cheaper than a conv2d call."""
    r = kernel // 2
    x = torch.arange(-r, r + 1, dtype=img.dtype)
    w = torch.exp(-0.5 * (x / sigma) ** 2)
    w = (w / w.sum()).tolist()
    p = F.pad(img[None], (r, r, r, r), mode="reflect")[0]
    H, W = img.shape[1:]
    rows = sum(wi * p[:, i:i + H, :] for i, wi in enumerate(w))
    return sum(wi * rows[:, :, i:i + W] for i, wi in enumerate(w))


def color_augment(img: Tensor, g: torch.Generator, strength: float = 1.0) -> Tensor:
    """SimCLR/BYOL-style photometric augmentation of [3, H, W] in 0..1, drawing from ``g``:
    colour jitter (0.4, 0.4, 0.4, 0.1) p=0.8, grayscale p=0.2, Gaussian blur p=0.5, solarize p=0.2."""
    def coin(p):
        return torch.rand((), generator=g).item() < p
    if coin(0.8):
        s = 0.4 * strength
        ops = torch.randperm(4, generator=g).tolist()
        factors = [_uniform(g, 1 - s, 1 + s), _uniform(g, 1 - s, 1 + s), _uniform(g, 1 - s, 1 + s),
                   _uniform(g, -0.1 * strength, 0.1 * strength)]
        for op in ops:
            if op == 0:
                img = TF.adjust_brightness(img, factors[0])
            elif op == 1:
                img = TF.adjust_contrast(img, factors[1])
            elif op == 2:
                img = TF.adjust_saturation(img, factors[2])
            else:
                img = TF.adjust_hue(img, factors[3])
    if coin(0.2):
        img = TF.rgb_to_grayscale(img, num_output_channels=3)
    if coin(0.5):
        img = gaussian_blur(img, max(3, (img.shape[-1] // 10) | 1), _uniform(g, 0.1, 2.0))
    if coin(0.2):
        img = TF.solarize(img, 0.5)
    return img.clamp(0, 1)


def to_tensor(image) -> Tensor:
    """uint8 HWC numpy / PIL -> float [3, H, W] in 0..1."""
    if not isinstance(image, Tensor):
        image = torch.from_numpy(np.array(image, dtype=np.uint8))
    if image.ndim == 2:
        image = image[..., None].expand(-1, -1, 3)
    return image[..., :3].permute(2, 0, 1).float().div_(255)


class EvalTransform:
    """Whole image resized to [3, size, size], normalised. Returns {"image"}."""

    def __init__(self, size: int):
        self.size = size

    def __call__(self, img: Tensor, g: torch.Generator) -> Dict[str, Tensor]:
        return {"image": normalize(TF.resize(img, [self.size, self.size], antialias=True))}


class SingleView:
    """CLIP / FLIP view: RandomResizedCrop(scale) to size, normalised. Returns {"image"}."""

    def __init__(self, size: int, scale=(0.5, 1.0)):
        self.size, self.scale = size, scale

    def __call__(self, img: Tensor, g: torch.Generator) -> Dict[str, Tensor]:
        box = random_resized_crop_box(img.shape[1], img.shape[2], g, self.scale)
        return {"image": normalize(crop_resize(img, box, self.size))}


class ThreeCrop:
    """A-CLIP views. Returns {"view1", "view2"} [3, size, size] (augmented), {"ema"} [3, ema_size,
    ema_size] (the EMA crop, normalised only), "boxes" [2, 4] float32 (y0, x0, h, w) of view 1 and
    view 2 inside the EMA crop, and "crops" [3, 4] int64 (top, left, h, w) of view1, view2, EMA in
    source pixels (for visualisation and the object-coverage ablation). ``ema_crop``: "zoom" (the
    published random zoom-out, fixed: ``zoom_out_box``) or "union" (the tight union: ``union_box``)."""

    def __init__(self, size: int, ema_size: int = None, scale=(0.5, 1.0), ema_crop: str = "zoom"):
        if ema_crop not in EMA_CROPS:
            raise ValueError(f"ema_crop={ema_crop!r}: expected one of {EMA_CROPS}")
        self.size, self.ema_size, self.scale, self.ema_crop = size, ema_size or size, scale, ema_crop

    def __call__(self, img: Tensor, g: torch.Generator) -> Dict[str, Tensor]:
        H, W = img.shape[1:]
        b1 = random_resized_crop_box(H, W, g, self.scale)
        b2 = random_resized_crop_box(H, W, g, self.scale)
        u = zoom_out_box(b1, b2, H, W, g) if self.ema_crop == "zoom" else union_box(b1, b2)
        boxes = torch.tensor([box_in_frame(b1, u), box_in_frame(b2, u)], dtype=torch.float32)
        assert bool(((boxes[:, :2] >= 0) & (boxes[:, :2] + boxes[:, 2:] <= 1 + 1e-6)).all()), boxes
        v1 = normalize(color_augment(crop_resize(img, b1, self.size), g))
        v2 = normalize(color_augment(crop_resize(img, b2, self.size), g))
        ema = normalize(crop_resize(img, u, self.ema_size))
        return {"view1": v1, "view2": v2, "ema": ema, "boxes": boxes,
                "crops": torch.tensor([b1, b2, u], dtype=torch.int64)}


class SlipViews:
    """SLIP views: "image" (RandomResizedCrop 0.5-1, for the CLIP loss) and "view1", "view2"
    (RandomResizedCrop 0.08-1 + photometric augmentation, for SimCLR)."""

    def __init__(self, size: int):
        self.clip = SingleView(size, (0.5, 1.0))
        self.size = size

    def __call__(self, img: Tensor, g: torch.Generator) -> Dict[str, Tensor]:
        out = self.clip(img, g)
        for key in ("view1", "view2"):
            box = random_resized_crop_box(img.shape[1], img.shape[2], g, (0.08, 1.0))
            out[key] = normalize(color_augment(crop_resize(img, box, self.size), g))
        return out


def make_transform(method: str, size: int, ema_crop: str = "zoom"):
    """The training transform of a method; aclip-eff's EMA view is made at half resolution.
    ``ema_crop``: the A-CLIP EMA crop (see ThreeCrop)."""
    if method in ("clip", "flip"):
        return SingleView(size)
    if method == "aclip":
        return ThreeCrop(size, ema_crop=ema_crop)
    if method == "aclip-eff":
        return ThreeCrop(size, ema_size=size // 2, ema_crop=ema_crop)
    if method == "slip":
        return SlipViews(size)
    raise ValueError(f"unknown method {method!r}")

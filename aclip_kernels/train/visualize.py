"""``--save-masks``: a PNG of sample images with their kept and removed patches.

For aclip*: per sample, the EMA view with its [CLS]-attention score map, then both online views
with the removed patches dimmed (the kept set is recomputed with the public
``aclip_kernels.attentive_mask`` from the same scores and boxes the loop uses). For flip: the view
with a random mask. clip / slip have no mask: the views are shown as they are.

On the embedded set it also measures the fraction of object patches kept (patches whose centre
lies inside the pasted emoji), the number an attentive mask should push above ``keep``.
"""
from __future__ import annotations

from typing import Optional, Tuple

import numpy as np
import torch

from .augment import MEAN, STD, SingleView, make_transform, to_tensor
from .data import make_source, sample_seed

__all__ = ["save_mask_png", "object_fraction_kept", "kept_pixels"]


def _show(img: torch.Tensor) -> np.ndarray:
    mean, std = torch.tensor(MEAN)[:, None, None], torch.tensor(STD)[:, None, None]
    return (img.cpu() * std + mean).clamp(0, 1).permute(1, 2, 0).numpy()


def kept_pixels(idx: torch.Tensor, grid: Tuple[int, int], size: Tuple[int, int]) -> np.ndarray:
    """[H, W] bool: True on the pixels of the kept patches (idx: kept positions on the grid)."""
    hg, wg = grid
    keep = np.zeros(hg * wg, bool)
    keep[idx.cpu().numpy()] = True
    ph, pw = size[0] // hg, size[1] // wg
    pixels = np.ones(tuple(size), bool)             # pixels past the last whole patch stay as they are
    pixels[:hg * ph, :wg * pw] = keep.reshape(hg, wg).repeat(ph, axis=0).repeat(pw, axis=1)
    return pixels


def _dim(img: np.ndarray, idx: torch.Tensor, grid: Tuple[int, int]) -> np.ndarray:
    keep = kept_pixels(idx, grid, img.shape[:2])
    return np.where(keep[..., None], img, img * 0.15)


def object_fraction_kept(idx: torch.Tensor, crop, obj_box, src_size: int, grid) -> Optional[float]:
    """Fraction of the object patches of a view that ``idx`` keeps. crop: (top, left, h, w) of the
    view in source pixels; obj_box: (y0, x0, h, w) normalised to the source; None without any."""
    hg, wg = grid
    top, left, h, w = [float(v) for v in crop]
    oy, ox, oh, ow = [v * src_size for v in obj_box]
    r = (np.arange(hg) + 0.5) / hg * h + top
    c = (np.arange(wg) + 0.5) / wg * w + left
    inside = ((r[:, None] >= oy) & (r[:, None] < oy + oh) & (c[None] >= ox) & (c[None] < ox + ow)).reshape(-1)
    if not inside.any():
        return None
    kept = np.zeros(hg * wg, bool)
    kept[idx.cpu().numpy()] = True
    return float((kept & inside).sum() / inside.sum())


@torch.no_grad()
def save_mask_png(path: str, cfg, model, scorer, size: int, source_kwargs, device,
                  rows: int = 6, measure: int = 128):
    """Write the PNG; returns (path, mean fraction of object patches kept over ``measure`` train
    samples of the embedded set, or None)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import aclip_kernels as ak

    source = make_source(cfg.data, "train", seed=cfg.seed, **source_kwargs) \
        if cfg.data == "embedded" or str(cfg.data).endswith((".csv", ".tsv")) else None
    if source is None:
        return None, None
    clip = model.clip
    patch = clip.visual.patch_size
    grid = (size // (patch[0] if isinstance(patch, tuple) else patch),) * 2
    aclip = cfg.method in ("aclip", "aclip-eff")
    transform = make_transform(cfg.method, size, cfg.ema_crop) if aclip else SingleView(size)
    n = min(len(source), max(rows, measure))
    samples = [transform(to_tensor(source.load(i)[0]), torch.Generator().manual_seed(sample_seed(cfg.seed, 99, i)))
               for i in range(n)]
    fractions = []
    if aclip:
        ema_img = torch.stack([s["ema"] for s in samples]).to(device)
        scores = scorer(ema_img).float()
        hs, ws = scorer.grid
        views = torch.cat([torch.stack([s["view1"] for s in samples]), torch.stack([s["view2"] for s in samples])])
        boxes = torch.cat([torch.stack([s["boxes"][0] for s in samples]),
                           torch.stack([s["boxes"][1] for s in samples])]).to(device)
        tokens = torch.zeros(2 * n, 1 + grid[0] * grid[1], 1, device=device)
        _, idx = ak.attentive_mask(tokens, scores.view(n, hs, ws), cfg.keep, grid=grid, block=cfg.block, boxes=boxes)
        idx = idx.cpu()
        panels = [[("EMA view + scores", _show(samples[i]["ema"]), scores[i].view(hs, ws).cpu().numpy()),
                   ("view 1 (kept)", _dim(_show(views[i]), idx[i], grid), None),
                   ("view 2 (kept)", _dim(_show(views[n + i]), idx[n + i], grid), None)] for i in range(min(rows, n))]
        if cfg.data == "embedded":
            for i in range(n):
                for v in range(2):
                    f = object_fraction_kept(idx[v * n + i], samples[i]["crops"][v].tolist(),
                                             source.dataset.object_box(i), source.dataset.image_size, grid)
                    if f is not None:
                        fractions.append(f)
    else:
        images = torch.stack([s["image"] for s in samples[:rows]])
        rows = images.shape[0]
        if cfg.method == "flip":
            tokens = torch.zeros(rows, 1 + grid[0] * grid[1], 1)
            _, idx = ak.random_mask(tokens, cfg.keep, grid=grid, generator=torch.Generator().manual_seed(0))
            panels = [[("random mask (kept)", _dim(_show(images[i]), idx[i], grid), None)] for i in range(min(rows, n))]
        else:
            panels = [[("view (no mask)", _show(images[i]), None)] for i in range(min(rows, n))]
    cols = len(panels[0])
    fig, axes = plt.subplots(cols, len(panels), figsize=(1.9 * len(panels), 2.0 * cols), squeeze=False)
    for i, column in enumerate(panels):
        for j, (title, img, heat) in enumerate(column):
            ax = axes[j][i]
            ax.imshow(img)
            if heat is not None:
                ax.imshow(heat, cmap="inferno", alpha=0.5, extent=(-0.5, img.shape[1] - 0.5, img.shape[0] - 0.5, -0.5),
                          interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_ylabel(title, fontsize=8)
    fig.suptitle(f"{cfg.method}: keep {cfg.keep:.0%} of patches"
                 + (f" (block {cfg.block}x{cfg.block})" if aclip else ""), fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path, (float(np.mean(fractions)) if fractions else None)

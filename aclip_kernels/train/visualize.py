"""``--save-masks``: a PNG of sample images with their kept and removed patches, readable alone.

For aclip*, one column per image, titled with its caption and the share of its object patches
each view keeps: the EMA view with both online crop boxes drawn (view 1 solid blue, view 2 dashed
orange), the EMA [CLS]-attention scores over it with a colour bar, then both online views with the
removed patches in hatched grey (the kept set is recomputed with the public
``aclip_kernels.attentive_mask`` from the same scores and boxes the loop uses). The online views
are shown without their colour jitter, blur and solarisation: those are training augmentation, not
part of the mask. For flip: the view with a random mask. clip / slip have no mask.

On the embedded set it also measures the fraction of object patches kept (patches whose centre
lies inside the pasted emoji), the number an attentive mask should push above ``keep``.
"""
from __future__ import annotations

import textwrap
from typing import Optional, Tuple

import numpy as np
import torch

from .augment import MEAN, STD, SingleView, crop_resize, make_transform, to_tensor
from .data import make_source, sample_seed

__all__ = ["save_mask_png", "object_fraction_kept", "kept_pixels", "hatch_removed", "BOX_COLOURS"]

BOX_COLOURS = {"view 1": ("#1f77b4", "-"), "view 2": ("#ff7f0e", "--")}     # colour, line style
REMOVED_GREY = (0.86, 0.45)           # the two greys of the hatching: light, striped darker


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


def hatch_removed(img: np.ndarray, idx: torch.Tensor, grid: Tuple[int, int]) -> np.ndarray:
    """[H, W, 3] in 0..1 with the pixels of the patches not in ``idx`` replaced by a neutral grey
    with diagonal hatching, which no image content resembles."""
    keep = kept_pixels(idx, grid, img.shape[:2])
    rows, cols = np.indices(keep.shape)
    stripe = ((rows + cols) // max(1, img.shape[0] // 32)) % 4 == 0
    grey = np.where(stripe, REMOVED_GREY[1], REMOVED_GREY[0])[..., None]
    return np.where(keep[..., None], img, grey)


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
    captions = [textwrap.fill(str(source.load(i)[1]), 22) for i in range(min(rows, n))]
    fractions, per_image = [], {}
    if aclip:
        ema_img = torch.stack([s["ema"] for s in samples]).to(device)
        scores = scorer(ema_img).float()
        hs, ws = scorer.grid
        boxes = torch.cat([torch.stack([s["boxes"][0] for s in samples]),
                           torch.stack([s["boxes"][1] for s in samples])]).to(device)
        tokens = torch.zeros(2 * n, 1 + grid[0] * grid[1], 1, device=device)
        _, idx = ak.attentive_mask(tokens, scores.view(n, hs, ws), cfg.keep, grid=grid, block=cfg.block, boxes=boxes)
        idx = idx.cpu()
        if cfg.data == "embedded":
            for i in range(n):
                for v in range(2):
                    f = object_fraction_kept(idx[v * n + i], samples[i]["crops"][v].tolist(),
                                             source.dataset.object_box(i), source.dataset.image_size, grid)
                    if f is not None:
                        fractions.append(f)
                        per_image[i, v] = f
        shown = min(rows, n)
        plain = [to_tensor(source.load(i)[0]) for i in range(shown)]      # the views without colour jitter
        views = [[crop_resize(plain[i], samples[i]["crops"][v].tolist(), size).permute(1, 2, 0).numpy()
                  for v in range(2)] for i in range(shown)]
        panels = [[("ema", _show(samples[i]["ema"]), samples[i]["boxes"]),
                   ("scores", _show(samples[i]["ema"]), scores[i].view(hs, ws).cpu().numpy()),
                   ("view 1", hatch_removed(views[i][0], idx[i], grid), None),
                   ("view 2", hatch_removed(views[i][1], idx[n + i], grid), None)] for i in range(shown)]
        labels = {"ema": "EMA view (scorer input)\nboxes: the two online crops",
                  "scores": "EMA [CLS] attention\n(mean over heads)",
                  "view 1": "online view 1: kept\n(hatched grey: removed)",
                  "view 2": "online view 2: kept\n(hatched grey: removed)"}
    else:
        images = torch.stack([s["image"] for s in samples[:rows]])
        rows = images.shape[0]
        if cfg.method == "flip":
            tokens = torch.zeros(rows, 1 + grid[0] * grid[1], 1)
            _, idx = ak.random_mask(tokens, cfg.keep, grid=grid, generator=torch.Generator().manual_seed(0))
            panels = [[("view", hatch_removed(_show(images[i]), idx[i], grid), None)] for i in range(min(rows, n))]
            labels = {"view": "random mask: kept\n(hatched grey: removed)"}
        else:
            panels = [[("view", _show(images[i]), None)] for i in range(min(rows, n))]
            labels = {"view": "view (no mask)"}
    cols = len(panels[0])
    fig, axes = plt.subplots(cols, len(panels), figsize=(1.9 * len(panels) + 1.6, 1.95 * cols + 1.3),
                             squeeze=False, layout="constrained")
    heat_image = None
    for i, column in enumerate(panels):
        for j, (kind, img, extra) in enumerate(column):
            ax = axes[j][i]
            ax.imshow(img, interpolation="nearest")
            h, w = img.shape[:2]
            if kind == "ema":
                for v, (name, (colour, style)) in enumerate(BOX_COLOURS.items()):
                    y0, x0, bh, bw = (extra[v] * torch.tensor([h, w, h, w])).tolist()
                    ax.add_patch(plt.Rectangle((x0 - 0.5, y0 - 0.5), bw, bh, fill=False, color=colour, ls=style, lw=2))
            elif kind == "scores":
                ax.imshow(img.mean(-1), cmap="gray", interpolation="nearest")
                heat_image = ax.imshow(extra, cmap="inferno", alpha=0.75, extent=(-0.5, w - 0.5, h - 0.5, -0.5),
                                       interpolation="nearest", vmin=0)
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_ylabel(labels[kind], fontsize=7)
        title = captions[i] if i < len(captions) else ""
        if per_image:
            kept = ", ".join(f"v{v + 1} {per_image[i, v]:.0%}" for v in range(2) if (i, v) in per_image)
            title += f"\nobject kept: {kept or 'not in view'}"
        axes[0][i].set_title(title, fontsize=7)
    if heat_image is not None:
        bar = fig.colorbar(heat_image, ax=list(axes[1]), shrink=0.9, pad=0.01)
        bar.set_label("share of [CLS] attention\n(sums to 1 per image)", fontsize=7)
        bar.ax.tick_params(labelsize=6)
        handles = [plt.Line2D([], [], color=c, ls=st, lw=2) for c, st in BOX_COLOURS.values()]
        fig.legend(handles, [f"{name} crop" for name in BOX_COLOURS], loc="outside lower center", ncol=2, fontsize=7)
    title = f"{cfg.method}: keep {cfg.keep:.0%} of patches" + (f" in {cfg.block}x{cfg.block} blocks" if aclip else "")
    if fractions:
        title += (f"; object patches kept: {np.mean(fractions):.0%} over {len(fractions)} views "
                  f"(a random mask keeps {cfg.keep:.0%})")
    if aclip:
        title += ("\nonline views shown without colour jitter / blur / solarisation (training augmentation, "
                  "not part of the mask)")
    fig.suptitle(title, fontsize=8)
    fig.savefig(path, dpi=130)
    plt.close(fig)
    return path, (float(np.mean(fractions)) if fractions else None)

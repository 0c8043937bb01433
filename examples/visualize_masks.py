"""Which patches A-CLIP keeps: EMA [CLS]-attention scores of scikit-image sample photos, two online
crops per photo with their removed 2x2 blocks in hatched grey, and FLIP's random mask for comparison.

    python examples/visualize_masks.py [--out runs/visualize_masks.png] [--checkpoint timm_vit_weights.pth]

Without a checkpoint the ViT has random weights, so the scores show the mechanism (box alignment,
2x2 blocks, 50% kept), not semantics, and the picture's title says so; load trained weights (a
state_dict, read with ``weights_only=True``) to see attention-driven masks.
"""
import argparse
import os

import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import timm
import torch
import torch.nn.functional as F
from skimage import data

import aclip_kernels as ak
from aclip_kernels.train.visualize import BOX_COLOURS, hatch_removed

parser = argparse.ArgumentParser()
parser.add_argument("--out", default=os.path.join("runs", "visualize_masks.png"), help="the PNG to write")
parser.add_argument("--checkpoint", default=None, help="a state_dict for timm vit_base_patch16_224")
args = parser.parse_args()

torch.manual_seed(0)
photos = [data.astronaut(), data.chelsea(), data.coffee(), data.rocket()]
images = torch.stack([F.interpolate(torch.from_numpy(np.ascontiguousarray(p)).permute(2, 0, 1)[None].float() / 255,
                                    size=(224, 224), mode="bilinear", antialias=True)[0] for p in photos])
mean, std = torch.tensor([0.485, 0.456, 0.406])[:, None, None], torch.tensor([0.229, 0.224, 0.225])[:, None, None]

model = timm.create_model("vit_base_patch16_224", pretrained=False)
if args.checkpoint:
    model.load_state_dict(torch.load(args.checkpoint, map_location="cpu", weights_only=True))
model = ak.patch_timm_vit(model)
scorer = ak.EMAScorer(ak.make_ema(model))
scores = scorer((images - mean) / std)                               # [4, 196]

b, views = len(photos), 2
size = 0.6 + 0.4 * torch.rand(views * b, 2)
boxes = torch.cat([(1 - size) * torch.rand(views * b, 2), size], dim=1)     # (y0, x0, h, w), view-major
crops = torch.cat([F.interpolate(images[i % b][None, :, round(y0 * 224):round((y0 + h) * 224),
                                               round(x0 * 224):round((x0 + w) * 224)], size=(224, 224), mode="bilinear")
                   for i, (y0, x0, h, w) in enumerate(boxes.tolist())])
model.train()
with torch.no_grad(), ak.masking(model, scores=scores, boxes=boxes, keep=0.5, block=2) as attentive:
    model((crops - mean) / std)
with torch.no_grad(), ak.masking(model, mode="random", keep=0.5, block=2) as rand:
    model((crops - mean) / std)


def hatched(img, idx):
    return hatch_removed(img.permute(1, 2, 0).clamp(0, 1).numpy(), idx, (14, 14))


cols = ["photo + online crop boxes", "EMA [CLS] attention", "view 1: A-CLIP mask", "view 2: A-CLIP mask",
        "view 1: random mask (FLIP)"]
fig, axes = plt.subplots(b, len(cols), figsize=(2.6 * len(cols) + 0.8, 2.6 * b + 1.0), layout="constrained")
for i in range(b):
    axes[i, 0].imshow(images[i].permute(1, 2, 0).numpy())
    for v, (colour, style) in enumerate(BOX_COLOURS.values()):
        y0, x0, h, w = (boxes[v * b + i] * 224).tolist()
        axes[i, 0].add_patch(plt.Rectangle((x0, y0), w, h, fill=False, color=colour, ls=style, lw=2))
    heat = axes[i, 1].imshow(scores[i].view(*scorer.grid).numpy(), cmap="inferno")     # its own range
    fig.colorbar(heat, ax=axes[i, 1], shrink=0.8).ax.tick_params(labelsize=6)
    axes[i, 2].imshow(hatched(crops[i], attentive.indices[i]))
    axes[i, 3].imshow(hatched(crops[b + i], attentive.indices[b + i]))
    axes[i, 4].imshow(hatched(crops[i], rand.indices[i]))
for ax, title in zip(axes[0], cols):
    ax.set_title(title, fontsize=9)
for ax in axes.flat:
    ax.set_xticks([])
    ax.set_yticks([])
fig.legend([plt.Line2D([], [], color=c, ls=st, lw=2) for c, st in BOX_COLOURS.values()],
           [f"{name} crop box" for name in BOX_COLOURS], loc="outside lower center", ncol=2, fontsize=8)
weights = f"weights from {os.path.basename(args.checkpoint)}" if args.checkpoint else \
    "RANDOM WEIGHTS: the scores show the mechanism, not what a trained model attends to"
fig.suptitle(f"A-CLIP attentive masks, ViT-B/16, keep 50% in 2x2 blocks (hatched grey: removed) — {weights}",
             fontsize=10)
os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
fig.savefig(args.out, dpi=80)
print(f"wrote {args.out}: {b} photos, {attentive.indices.shape[1]} of 196 patches kept per view")

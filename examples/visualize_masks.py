"""Which patches A-CLIP keeps: EMA [CLS]-attention scores of scikit-image sample photos, two online
crops per photo with their removed 2x2 blocks greyed out, and FLIP's random mask for comparison.

    python examples/visualize_masks.py --out masks.png [--checkpoint timm_vit_weights.pth]

Without a checkpoint the ViT has random weights, so the scores show the mechanism (box alignment,
2x2 blocks, 50% kept), not semantics; load trained weights to see attention-driven masks.
"""
import argparse

import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import timm
import torch
import torch.nn.functional as F
from skimage import data

import aclip_kernels as ak
from aclip_kernels.train.visualize import kept_pixels

parser = argparse.ArgumentParser()
parser.add_argument("--out", default="masks.png")
parser.add_argument("--checkpoint", default=None, help="a state_dict for timm vit_base_patch16_224")
args = parser.parse_args()

torch.manual_seed(0)
photos = [data.astronaut(), data.chelsea(), data.coffee(), data.rocket()]
images = torch.stack([F.interpolate(torch.from_numpy(np.ascontiguousarray(p)).permute(2, 0, 1)[None].float() / 255,
                                    size=(224, 224), mode="bilinear", antialias=True)[0] for p in photos])
mean, std = torch.tensor([0.485, 0.456, 0.406])[:, None, None], torch.tensor([0.229, 0.224, 0.225])[:, None, None]

model = timm.create_model("vit_base_patch16_224", pretrained=False)
if args.checkpoint:
    model.load_state_dict(torch.load(args.checkpoint, map_location="cpu"))
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


def greyed(img, idx):
    keep = torch.from_numpy(kept_pixels(idx, (14, 14), (224, 224))).float()
    return (img * keep + 0.5 * (1 - keep)).permute(1, 2, 0).numpy()


cols = ["image + view boxes", "EMA scores", "view 1 (A-CLIP)", "view 2 (A-CLIP)", "view 1 (random)"]
fig, axes = plt.subplots(b, len(cols), figsize=(3 * len(cols), 3 * b))
for i in range(b):
    axes[i, 0].imshow(images[i].permute(1, 2, 0).numpy())
    for v, colour in zip(range(views), ("yellow", "cyan")):
        y0, x0, h, w = (boxes[v * b + i] * 224).tolist()
        axes[i, 0].add_patch(plt.Rectangle((x0, y0), w, h, fill=False, color=colour, lw=2))
    axes[i, 1].imshow(scores[i].view(*scorer.grid).numpy(), cmap="magma")
    axes[i, 2].imshow(greyed(crops[i], attentive.indices[i]))
    axes[i, 3].imshow(greyed(crops[b + i], attentive.indices[b + i]))
    axes[i, 4].imshow(greyed(crops[i], rand.indices[i]))
for ax, title in zip(axes[0], cols):
    ax.set_title(title)
for ax in axes.flat:
    ax.axis("off")
fig.tight_layout()
fig.savefig(args.out, dpi=80)
print(f"wrote {args.out}: {b} photos, {attentive.indices.shape[1]} of 196 patches kept per view")

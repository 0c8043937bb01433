"""A-CLIP attentive masking dropped into a timm ViT: EMA scores -> two masked online views -> a step.

    python examples/timm_dropin.py          (random weights, random images; CPU is fine)
"""
import timm
import torch
import torch.nn.functional as F

import aclip_kernels as ak

torch.manual_seed(0)
model = ak.patch_timm_vit(timm.create_model("vit_small_patch16_224", pretrained=False, num_classes=10))
ema = ak.make_ema(model)                      # deep copy: no grad, eval mode
scorer = ak.EMAScorer(ema)                    # SDPA forward + [CLS] row per block, no attention maps
opt = torch.optim.AdamW(model.parameters(), lr=5e-4, betas=(0.9, 0.98), weight_decay=0.5)


def crop(images, boxes, size=224):
    """The (y0, x0, h, w) boxes (fractions of the image) of each image, resized to size x size."""
    side = images.shape[-1]
    out = []
    for img, (y0, x0, h, w) in zip(images, (boxes * side).round().long().tolist()):
        out.append(F.interpolate(img[None, :, y0:y0 + h, x0:x0 + w], size=(size, size), mode="bilinear"))
    return torch.cat(out)


steps, batch, views = 2, 4, 2
for step in range(steps):
    images, labels = torch.randn(batch, 3, 224, 224), torch.randint(0, 10, (batch,))
    # two online crops per image (scale 0.5-1), rows view-major: row v * batch + i
    size = 0.7 + 0.3 * torch.rand(views * batch, 2)
    boxes = torch.cat([(1 - size) * torch.rand(views * batch, 2), size], dim=1)
    online = crop(images.repeat(views, 1, 1, 1), boxes)

    scores = scorer(images)                   # [batch, 196] float32, on scorer.grid (14, 14)
    model.train()
    with ak.masking(model, scores=scores, boxes=boxes, keep=0.5, block=2) as state:
        logits = model(online)                # the blocks see 1 + 100 tokens per view
    loss = F.cross_entropy(logits, labels.repeat(views))
    opt.zero_grad()
    loss.backward()
    opt.step()
    ak.ema_update_(ema, model, ak.cosine_momentum(step, steps))
    print(f"step {step}: loss {loss.item():.4f}, tokens per view {state.tokens}, "
          f"kept patches {tuple(state.indices.shape)}")

"""A-CLIP attentive masking dropped into an open_clip CLIP ViT-B-16: one contrastive training step
with two attentively masked views and the EMA visual tower scoring the full image.

    python examples/open_clip_dropin.py     (random weights, random images; ~20 s on a CPU)
"""
import open_clip
import torch

import aclip_kernels as ak

torch.manual_seed(0)
model = ak.patch_open_clip(open_clip.create_model("ViT-B-16", pretrained=None))
tokenizer = open_clip.get_tokenizer("ViT-B-16")
ema = ak.make_ema(model.visual)               # the EMA image tower (no grad, eval mode)
scorer = ak.EMAScorer(ema)
loss_fn = open_clip.ClipLoss()
opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-4,
                        betas=(0.9, 0.98), weight_decay=0.5)

batch, views = 2, 2
ema_images = torch.randn(batch, 3, 224, 224)                  # the EMA crop (contains both views)
online = torch.randn(views * batch, 3, 224, 224)              # view-major: row v * batch + i
size = 0.5 + 0.5 * torch.rand(views * batch, 2)
boxes = torch.cat([(1 - size) * torch.rand(views * batch, 2), size], dim=1)   # (y0, x0, h, w)
texts = tokenizer(["a photo of a cat", "a diagram of a dog"])

ema_features, scores = scorer.forward_with_output(ema_images)   # [2, 512] (BYOL target), [2, 196]
model.train()
with ak.masking(model, scores=scores, boxes=boxes, keep=0.5, block=2) as state:
    image_features = model.encode_image(online, normalize=True)    # blocks see 1 + 100 tokens
text_features = model.encode_text(texts, normalize=True)
scale = model.logit_scale.exp()
loss = sum(loss_fn(v, text_features, scale) for v in image_features.view(views, batch, -1)) / views
opt.zero_grad()
loss.backward()
opt.step()
ak.ema_update_(ema, model.visual, ak.cosine_momentum(step=1, total=100))
print(f"loss {loss.item():.4f}, tokens per view {state.tokens}, EMA features {tuple(ema_features.shape)}, "
      f"scores {tuple(scores.shape)} on grid {scorer.grid}")

"""A-CLIP attentive masking dropped into a Hugging Face transformers SiglipModel: one sigmoid-loss
step with two attentively masked views. SigLIP has no [CLS] token: the EMA vision tower scores the
patches with its attention-pooling head's probe (docs/design.md, "Scoring without a [CLS] token").
Offline: model, image processor and tokenizer are built from configs.

    python examples/hf_siglip_aclip.py      (random weights, random images; CPU is fine)
"""
import numpy as np
import torch
import torch.nn.functional as F
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast, SiglipConfig, SiglipImageProcessor, SiglipModel

import aclip_kernels as ak
from aclip_kernels.testing import crop_views, random_boxes

torch.manual_seed(0)
captions = ["a photo of a cat", "a diagram of a dog"]
words = ["<pad>", "<unk>"] + sorted({w for c in captions for w in c.split()})
core = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
core.pre_tokenizer = pre_tokenizers.Whitespace()
tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>")
processor = SiglipImageProcessor(size={"height": 224, "width": 224})
config = SiglipConfig(
    text_config=dict(vocab_size=len(words), hidden_size=384, intermediate_size=1536, num_hidden_layers=4,
                     num_attention_heads=6, max_position_embeddings=16, pad_token_id=0, bos_token_id=1, eos_token_id=1),
    vision_config=dict(image_size=224, patch_size=16, hidden_size=384, intermediate_size=1536,
                       num_hidden_layers=6, num_attention_heads=6))
model = ak.patch_hf_clip(SiglipModel(config))
ema = ak.make_ema(model.vision_model)         # the EMA image tower (no grad, eval mode)
scorer = ak.EMAScorer(ema)                    # source "probe": the MAP head's attention over the patches
opt = torch.optim.AdamW(model.parameters(), lr=5e-4, betas=(0.9, 0.98), weight_decay=0.5)

batch, views = 2, 2
raw = [np.random.randint(0, 256, (256, 320, 3), dtype=np.uint8) for _ in range(batch)]
ema_images = processor(images=raw, return_tensors="pt")["pixel_values"]           # [2, 3, 224, 224]
boxes = random_boxes(views * batch, torch.Generator().manual_seed(0))          # (y0, x0, h, w) in the EMA crop
online = crop_views(ema_images, boxes, 224)                                        # [4, 3, 224, 224]
text = tokenizer(captions, padding="max_length", max_length=16, return_tensors="pt")

ema_out, scores = scorer.forward_with_output(ema_images)      # scores [2, 196] on scorer.grid (14, 14)
model.train()
with ak.masking(model, scores=scores, boxes=boxes, keep=0.5, block=2) as state:
    image = model.get_image_features(pixel_values=online).pooler_output            # the encoder sees 100
text_features = F.normalize(model.get_text_features(input_ids=text["input_ids"]).pooler_output, dim=-1)
logits = model.logit_scale.exp() * F.normalize(image, dim=-1).view(views, batch, -1) @ text_features.T
logits = logits + model.logit_bias
labels = 2 * torch.eye(batch) - 1                                                  # +1 on the pairs, -1 off
loss = -F.logsigmoid(labels * logits).sum() / (batch * views)
opt.zero_grad()
loss.backward()
opt.step()
ak.ema_update_(ema, model.vision_model, ak.cosine_momentum(step=1, total=100))
print(f"loss {loss.item():.4f}, tokens per view {state.tokens} (25 blocks of 2x2, no [CLS]), "
      f"scores {tuple(scores.shape)} on grid {scorer.grid}, EMA pooled {tuple(ema_out.pooler_output.shape)}")

"""A-CLIP attentive masking dropped into a Hugging Face transformers CLIPModel: one contrastive step
with two attentively masked views, the EMA vision tower scoring the EMA crop ([CLS] rows per layer,
from its own SDPA forward). Offline: model, image processor and tokenizer are built from configs.

    python examples/hf_clip_aclip.py        (random weights, random images; CPU is fine)
"""
import numpy as np
import torch
import torch.nn.functional as F
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, PreTrainedTokenizerFast

import aclip_kernels as ak
from aclip_kernels.testing import crop_views, random_boxes

torch.manual_seed(0)
captions = ["a photo of a cat", "a diagram of a dog"]
words = ["<pad>", "<unk>", "<bos>", "<eos>"] + sorted({w for c in captions for w in c.split()})
vocab = {w: i for i, w in enumerate(words)}
core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
core.pre_tokenizer = pre_tokenizers.Whitespace()
core.post_processor = processors.TemplateProcessing(single="<bos> $A <eos>",
                                                    special_tokens=[("<bos>", 2), ("<eos>", 3)])
tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", eos_token="<eos>")
processor = CLIPImageProcessor(size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224})
config = CLIPConfig(
    text_config=dict(vocab_size=len(words), hidden_size=256, intermediate_size=1024, num_hidden_layers=4,
                     num_attention_heads=4, eos_token_id=vocab["<eos>"], pad_token_id=0, bos_token_id=2),
    vision_config=dict(image_size=224, patch_size=16, hidden_size=384, intermediate_size=1536,
                       num_hidden_layers=6, num_attention_heads=6), projection_dim=256)
model = ak.patch_hf_clip(CLIPModel(config))
ema = ak.make_ema(model.vision_model)         # the EMA image tower (no grad, eval mode)
scorer = ak.EMAScorer(ema)                    # [CLS] row of every layer, via q_proj / k_proj hooks
opt = torch.optim.AdamW(model.parameters(), lr=5e-4, betas=(0.9, 0.98), weight_decay=0.5)

batch, views = 2, 2
raw = [np.random.randint(0, 256, (256, 320, 3), dtype=np.uint8) for _ in range(batch)]
ema_images = processor(images=raw, return_tensors="pt")["pixel_values"]           # [2, 3, 224, 224]
boxes = random_boxes(views * batch, torch.Generator().manual_seed(0))          # (y0, x0, h, w) in the EMA crop
online = crop_views(ema_images, boxes, 224)                                        # [4, 3, 224, 224]
text = tokenizer(captions, padding=True, return_tensors="pt")

ema_out, scores = scorer.forward_with_output(ema_images)      # scores [2, 196] on scorer.grid (14, 14)
model.train()
with ak.masking(model, scores=scores, boxes=boxes, keep=0.5, block=2) as state:
    image = model.get_image_features(pixel_values=online).pooler_output            # the encoder sees 1 + 100
text_features = F.normalize(model.get_text_features(**text).pooler_output, dim=-1)
logits = model.logit_scale.exp() * F.normalize(image, dim=-1).view(views, batch, -1) @ text_features.T
labels = torch.arange(batch)
loss = sum(F.cross_entropy(lg, labels) + F.cross_entropy(lg.T, labels) for lg in logits) / (2 * views)
opt.zero_grad()
loss.backward()
opt.step()
ak.ema_update_(ema, model.vision_model, ak.cosine_momentum(step=1, total=100))
print(f"loss {loss.item():.4f}, tokens per view {state.tokens} (1 + 25 blocks of 2x2), "
      f"scores {tuple(scores.shape)} on grid {scorer.grid}, EMA pooled {tuple(ema_out.pooler_output.shape)}")

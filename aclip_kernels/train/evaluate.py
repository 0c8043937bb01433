"""Evaluation: zero-shot classification with prompt templates, and image<->text retrieval.

Retrieval ranks the val set's distinct captions for every image (image->text) and the val images
for every image's caption (text->image); a hit at k is a correct caption (or an image whose caption
is that text) among the top k. Captions repeated across images (the embedded set's class names)
count as the same text, so on data with unique captions this is the usual recall@k.

Zero-shot classification (when the val set has class labels, as the embedded set does): each class
is the mean of its L2-normalised prompt embeddings over ``TEMPLATES``; accuracy is top-1 over the
classes, reported beside the chance level 1 / C.
"""
from __future__ import annotations

from typing import Dict, Sequence

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

__all__ = ["TEMPLATES", "encode_texts", "encode_images", "evaluate"]

TEMPLATES = ("{}", "a photo of {}.", "an image of {}.", "a picture with {} in it.")


@torch.no_grad()
def encode_texts(clip, tokenizer, texts: Sequence[str], device, batch_size: int = 256) -> torch.Tensor:
    """[len(texts), E] L2-normalised text embeddings."""
    out = []
    for i in range(0, len(texts), batch_size):
        tokens = tokenizer(list(texts[i:i + batch_size])).to(device)
        out.append(F.normalize(clip.encode_text(tokens).float(), dim=-1))
    return torch.cat(out)


@torch.no_grad()
def encode_images(clip, evalset, device, batch_size: int = 256):
    """([N, E] L2-normalised image embeddings, captions list, labels [N])."""
    feats, captions, labels = [], [], []
    loader = DataLoader(evalset, batch_size=batch_size, shuffle=False,
                        collate_fn=lambda items: items)
    for items in loader:
        images = torch.stack([it["image"] for it in items]).to(device)
        feats.append(F.normalize(clip.encode_image(images).float(), dim=-1))
        captions += [it["caption"] for it in items]
        labels += [it["label"] for it in items]
    return torch.cat(feats), captions, torch.tensor(labels)


def _recall(hits_rank: torch.Tensor, ks) -> Dict[int, float]:
    return {k: float((hits_rank < k).float().mean()) for k in ks}


@torch.no_grad()
def evaluate(clip, tokenizer, evalset, device="cpu", templates: Sequence[str] = TEMPLATES,
             ks=(1, 5)) -> Dict[str, float]:
    """Metrics of ``clip`` (an open_clip model, eval mode is set and restored) on ``evalset``
    (``data.EvalSet``): i2t_r@k, t2i_r@k, and zeroshot_top1 / zeroshot_chance when labelled."""
    was_training = clip.training
    clip.eval()
    try:
        images, captions, labels = encode_images(clip, evalset, device)
        unique = sorted(set(captions))
        cid = torch.tensor([unique.index(c) for c in captions])
        texts = encode_texts(clip, tokenizer, unique, device)
        sims = (images @ texts.t()).cpu()                                 # [N, U]
        # image -> text: rank of the correct caption among the distinct captions
        i2t_rank = (sims > sims.gather(1, cid[:, None])).sum(1)
        # text -> image: rank of the first image with that caption among all images
        sims_t = sims.t()[cid]                                            # [N texts, N images]
        same = cid[None, :] == cid[:, None]
        best_pos = sims_t.masked_fill(~same, float("-inf")).max(1).values
        t2i_rank = (sims_t > best_pos[:, None]).sum(1)
        metrics = {"val_samples": len(captions), "val_captions": len(unique)}
        metrics.update({f"i2t_r@{k}": v for k, v in _recall(i2t_rank, ks).items()})
        metrics.update({f"t2i_r@{k}": v for k, v in _recall(t2i_rank, ks).items()})
        classnames = getattr(evalset, "classnames", None)
        if classnames and bool((labels >= 0).all()):
            per_class = []
            for name in classnames:
                e = encode_texts(clip, tokenizer, [t.format(name) for t in templates], device)
                per_class.append(F.normalize(e.mean(0), dim=-1))
            logits = (images @ torch.stack(per_class).t()).cpu()
            metrics["zeroshot_top1"] = float((logits.argmax(1) == labels).float().mean())
            metrics["zeroshot_chance"] = 1.0 / len(classnames)
            metrics["zeroshot_classes"] = len(classnames)
        return metrics
    finally:
        clip.train(was_training)

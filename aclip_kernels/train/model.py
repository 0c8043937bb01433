"""Models: open_clip CLIP towers (patched, not forked), the SSL heads, and the per-method forward.

``build_clip(name)`` makes ``open_clip.create_model(name, pretrained=None)`` and open_clip's
tokenizer for any open_clip config ("ViT-B-16", ...) plus the configs shipped in
``model_configs/``: "ACLIP-Tiny" (7.8M parameters, 32 px, 8x8 patches of 4 px; trains in minutes on
two CPU cores) and "ACLIP-Test" (for the test suite). The image tower is then patched by
``aclip_kernels.patch_open_clip`` so that ``aclip_kernels.masking(...)`` drops tokens inside it.

``TrainModel`` is the module DDP wraps. Its forward takes one micro-batch and returns the loss
terms of the method; the EMA side (scores and BYOL targets, no gradient) is computed by the loop
and passed in.
"""
from __future__ import annotations

import contextlib
import logging
import pathlib
from typing import Dict, Optional

import open_clip
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..integrations import masking
from . import losses

__all__ = ["METHODS", "VIEWS", "MASKS", "LOSSES", "register_model_configs", "known_model", "build_clip", "MLPHead",
           "TrainModel"]

METHODS = ("clip", "flip", "aclip", "aclip-eff", "slip")
VIEWS, MASKS, LOSSES = (1, 2), ("attentive", "random", "none"), ("full", "clip")
CONFIG_DIR = pathlib.Path(__file__).with_name("model_configs")
_registered = False


def register_model_configs() -> None:
    """Add ``model_configs/*.json`` to open_clip's model registry (idempotent)."""
    global _registered
    if not _registered:
        open_clip.add_model_config(CONFIG_DIR)
        _registered = True


def known_model(name: str) -> bool:
    """Whether ``build_clip`` has a config for ``name`` (hub and local-dir references are trusted)."""
    register_model_configs()
    return name.startswith(("hf-hub:", "local-dir:")) or name in open_clip.list_models()


def build_clip(name: str, image_size: Optional[int] = None):
    """(open_clip model, tokenizer) with random weights. image_size overrides the config's."""
    register_model_configs()
    level = logging.getLogger().level
    logging.getLogger().setLevel(logging.ERROR)  # "No pretrained weights loaded" is intended
    try:
        model = open_clip.create_model(name, pretrained=None, force_image_size=image_size)
    finally:
        logging.getLogger().setLevel(level)
    return model, open_clip.get_tokenizer(name)


def image_size_of(clip) -> int:
    size = clip.visual.image_size
    return int(size[0] if isinstance(size, (tuple, list)) else size)


class MLPHead(nn.Sequential):
    """[*, in_dim] -> [*, out_dim]: Linear -> LayerNorm -> GELU -> Linear. LayerNorm instead of the
    published BatchNorm keeps a DDP step identical to the single-process step."""

    def __init__(self, in_dim: int, hidden: int, out_dim: int):
        super().__init__(nn.Linear(in_dim, hidden), nn.LayerNorm(hidden), nn.GELU(), nn.Linear(hidden, out_dim))


class TrainModel(nn.Module):
    """The trainable modules of one method and its online forward.

    clip: open_clip CLIP (image tower patched with ``patch_open_clip``). Heads, on the image
    embedding [b, E]: ``simclr_head`` (slip, aclip*), ``byol_projector`` + ``byol_predictor``
    (aclip*). ``ema_source()`` is the part the EMA copies: the image tower and the BYOL projector.
    """

    def __init__(self, clip: nn.Module, method: str, ssl_dim: int = 256, ssl_hidden: int = 1024,
                 keep: float = 0.5, block: int = 2, simclr_tau: float = 0.1, *, views: int = 2,
                 mask: str = "attentive", loss: str = "full"):
        super().__init__()
        if method not in METHODS:
            raise ValueError(f"method={method!r} must be one of {METHODS}")
        self.method, self.keep, self.block, self.simclr_tau = method, keep, block, simclr_tau
        self.set_variant(views, mask, loss)
        self.clip = clip
        embed = clip.visual.output_dim                               # the joint embedding size E
        if method in ("slip", "aclip", "aclip-eff"):
            self.simclr_head = MLPHead(embed, ssl_hidden, ssl_dim)
        if method in ("aclip", "aclip-eff"):
            self.byol_projector = MLPHead(embed, ssl_hidden, ssl_dim)
            self.byol_predictor = MLPHead(ssl_dim, ssl_hidden, ssl_dim)

    def set_variant(self, views: int = 2, mask: str = "attentive", loss: str = "full") -> None:
        """The masking-ablation variants of the aclip* forward (the defaults are A-CLIP as
        published; other methods accept only the defaults). ``views``: 1 (view 1 only) or 2 online
        views; ``mask``: "attentive" (EMA scores, box-aligned), "random" (uniform, same ``keep``
        and ``block``) or "none" (every token); ``loss``: "full" (A-CLIP's losses; with one view
        CLIP + 2 * BYOL, SimCLR needing two views) or "clip" (the CLIP term only, averaged over
        the views)."""
        if views not in VIEWS or mask not in MASKS or loss not in LOSSES:
            raise ValueError(f"views={views!r}, mask={mask!r}, loss={loss!r}: expected views in {VIEWS}, "
                             f"mask in {MASKS}, loss in {LOSSES}")
        if self.method not in ("aclip", "aclip-eff") and (views, mask, loss) != (2, "attentive", "full"):
            raise ValueError(f"views / mask / loss variants apply to aclip and aclip-eff, not {self.method!r}")
        self.views, self.mask, self.loss = views, mask, loss

    def needs_ema(self) -> bool:
        """Whether the forward uses the EMA side (scores or BYOL targets)."""
        return self.method in ("aclip", "aclip-eff") and (self.mask == "attentive" or self.loss == "full")

    def ema_source(self) -> nn.Module:
        """The modules the EMA encoder tracks (same names in the EMA copy)."""
        return nn.ModuleDict({"visual": self.clip.visual, "projector": self.byol_projector})

    def _text(self, text: Tensor) -> Tensor:
        return F.normalize(self.clip.encode_text(text), dim=-1)

    def forward(self, batch: Dict[str, Tensor], scores: Optional[Tensor] = None,
                ema_target: Optional[Tensor] = None) -> Dict[str, Tensor]:
        """batch: "text" [b, L] tokens and the method's views (see augment.py): "image"
        [b, 3, S, S] (clip, flip, slip), "view1"/"view2" [b, 3, S, S] (slip, aclip*), "boxes"
        [2b, 4] view-major (aclip*). scores: [b, Ns] EMA patch scores; ema_target: [b, ssl_dim]
        EMA projector output (aclip*). Returns {"loss": scalar, and each term}."""
        clip, method = self.clip, self.method
        scale = clip.logit_scale.exp()
        text = self._text(batch["text"])
        if method in ("clip", "flip", "slip"):
            if method == "flip":
                with masking(clip, mode="random", keep=self.keep):
                    image = clip.encode_image(batch["image"])
            else:
                image = clip.encode_image(batch["image"])
            out = {"clip": losses.clip_loss(F.normalize(image, dim=-1), text, scale)}
            if method == "slip":
                b = batch["view1"].shape[0]
                z = self.simclr_head(clip.encode_image(torch.cat([batch["view1"], batch["view2"]])))
                out["simclr"] = losses.simclr_loss(z[:b], z[b:], self.simclr_tau)
            out["loss"] = sum(out.values())
            return out

        # aclip / aclip-eff: both online views in one pass, stacked view-major, attentive masking
        b = batch["view1"].shape[0]
        if (self.views, self.mask, self.loss) != (2, "attentive", "full"):
            return self._variant_forward(batch, scores, ema_target, text, scale)
        views = torch.cat([batch["view1"], batch["view2"]])
        with masking(clip, scores=scores, boxes=batch["boxes"], keep=self.keep,
                                   block=self.block):
            image = clip.encode_image(views)                          # [2b, E]
        f1, f2 = image[:b], image[b:]
        out = {"clip1": losses.clip_loss(F.normalize(f1, dim=-1), text, scale),
               "clip2": losses.clip_loss(F.normalize(f2, dim=-1), text, scale)}
        z = self.simclr_head(image)
        out["simclr"] = losses.simclr_loss(z[:b], z[b:], self.simclr_tau)
        p = self.byol_predictor(self.byol_projector(image))
        out["byol"] = (losses.byol_loss(p[:b], ema_target) + losses.byol_loss(p[b:], ema_target)) / 2
        out["loss"] = 0.5 * out["clip1"] + 0.5 * out["clip2"] + out["simclr"] + 2 * out["byol"]
        return out

    def _variant_forward(self, batch, scores, ema_target, text, scale) -> Dict[str, Tensor]:
        """The ablation variants (``set_variant``): 1 or 2 views, attentive / random / no mask,
        full or CLIP-only loss. Random masking draws from torch's global generator."""
        clip, b, v = self.clip, batch["view1"].shape[0], self.views
        views = batch["view1"] if v == 1 else torch.cat([batch["view1"], batch["view2"]])
        if self.mask == "attentive":
            ctx = masking(clip, scores=scores, boxes=batch["boxes"][:v * b], keep=self.keep, block=self.block)
        elif self.mask == "random":
            ctx = masking(clip, mode="random", keep=self.keep, block=self.block)
        else:
            ctx = contextlib.nullcontext()
        with ctx:
            image = clip.encode_image(views)                          # [v*b, E]
        out = {f"clip{i + 1}": losses.clip_loss(F.normalize(image[i * b:(i + 1) * b], dim=-1), text, scale)
               for i in range(v)}
        total = sum(out.values()) / v
        if self.loss == "full":
            if v == 2:
                z = self.simclr_head(image)
                out["simclr"] = losses.simclr_loss(z[:b], z[b:], self.simclr_tau)
                total = total + out["simclr"]
            p = self.byol_predictor(self.byol_projector(image))
            out["byol"] = sum(losses.byol_loss(p[i * b:(i + 1) * b], ema_target) for i in range(v)) / v
            total = total + 2 * out["byol"]
        out["loss"] = total
        return out

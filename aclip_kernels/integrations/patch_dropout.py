"""Drop-in attentive (A-CLIP) and random (FLIP) token masking for timm and open_clip ViTs.

``patch_timm_vit(model)`` / ``patch_open_clip(model)`` replace the model's PatchDropout (or the
Identity that stands in for it) with an ``AttentivePatchDropout``, in place. The per-step inputs
reach it only through ``masking(model, ...)``, a ``with`` block that attaches them to the patched
modules and detaches them on exit:

    with aclip_kernels.masking(model, scores=scores, boxes=boxes, keep=0.5, block=2):
        out = model(images)                          # the blocks see P + 100 tokens per row
    with aclip_kernels.masking(model, mode="random", keep=0.5):
        out = model(images)

Outside a ``masking`` block the module is the PatchDropout it replaced (same prob; prob 0 is the
identity), and in eval mode it always keeps every token. Patched models script with torch.jit.script
(``masking`` is eager-only), compile with torch.compile (also masked) and trace with torch.fx (masked
only with AttentivePatchDropout as a leaf module).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Iterator, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from ..ops import attentive_mask, random_mask
from . import _models

__all__ = ["AttentivePatchDropout", "AttentivePatchDropoutWithIndices", "MaskingState", "masking", "patch_timm_vit",
           "patch_open_clip"]

MODES = ("attentive", "random")


@dataclass
class MaskingState:
    """The inputs of one ``masking`` block, and what the patched modules did with them.

    ``indices`` is the last call's kept patch positions [Bx, n] (int64, ascending, 0..N-1) and
    ``tokens`` the token count (P + n) it passed on; ``calls`` counts masked forwards.
    """
    mode: str
    keep: object
    block: int
    scores: Optional[Tensor] = None
    boxes: Optional[Tensor] = None
    grid: Optional[Tuple[int, int]] = None
    generator: Optional[torch.Generator] = None
    indices: Optional[Tensor] = field(default=None, repr=False)
    tokens: Optional[int] = None
    calls: int = 0


class AttentivePatchDropout(nn.Module):
    """PatchDropout with A-CLIP's attentive selection.

    Call signature and prefix handling of timm's ``PatchDropout`` (``prob``, ``num_prefix_tokens``,
    ``ordered``) and of open_clip's (``exclude_first_token``: True means one prefix token, False
    none). ``grid`` is the online patch grid (Hg, Wg) (default square).

    x [B, P+N, D] -> [B, P+n, D]. Training mode inside ``masking``: attentive or random selection
    (prefix first, kept patches ascending). Training mode outside: random patch dropout with
    ``prob``, as the replaced module (timm or open_clip flavour). Eval mode: x unchanged.

    TorchScript: the scripted module is the replaced PatchDropout (eval and patch dropout as
    above); ``masking`` is eager-only and refuses a scripted model.
    """
    __jit_ignored_attributes__ = ["_masking"]

    def __init__(self, prob: float = 0.0, num_prefix_tokens: int = 1, ordered: bool = False, *,
                 exclude_first_token: Optional[bool] = None, grid: Optional[Sequence[int]] = None):
        super().__init__()
        if not 0.0 <= prob < 1.0:
            raise ValueError(f"prob={prob} must be in [0, 1)")
        self.prob = float(prob)
        self.flavour = "timm" if exclude_first_token is None else "open_clip"
        self.exclude_first_token = exclude_first_token
        self.num_prefix_tokens = int(num_prefix_tokens if exclude_first_token is None else bool(exclude_first_token))
        self.ordered = ordered
        self.grid = None if grid is None else (int(grid[0]), int(grid[1]))
        self._masking = None                             # the MaskingState of a masking block

    @classmethod
    def from_timm(cls, module: nn.Module, num_prefix_tokens: int, grid=None) -> "AttentivePatchDropout":
        """From timm's PatchDropout / PatchDropoutWithIndices (as AttentivePatchDropoutWithIndices) /
        Identity (prob 0)."""
        kind = AttentivePatchDropoutWithIndices if type(module).__name__ == "PatchDropoutWithIndices" else cls
        return kind(getattr(module, "prob", 0.0), getattr(module, "num_prefix_tokens", num_prefix_tokens),
                    getattr(module, "ordered", False), grid=grid)

    @classmethod
    def from_open_clip(cls, module: nn.Module, grid=None) -> "AttentivePatchDropout":
        """From open_clip's PatchDropout / Identity (prob 0)."""
        return cls(getattr(module, "prob", 0.0), exclude_first_token=getattr(module, "exclude_first_token", True),
                   grid=grid)

    def extra_repr(self) -> str:
        return (f"prob={self.prob}, num_prefix_tokens={self.num_prefix_tokens}, flavour={self.flavour}, "
                f"grid={self.grid}")

    def __prepare_scriptable__(self):
        if self._masking is not None:
            raise RuntimeError("torch.jit.script inside a masking block: masking is eager-only, "
                               "script the model outside it")
        return self

    def _patch_dropout(self, x: Tensor) -> Tuple[Tensor, Optional[Tensor]]:
        """The replaced module's random patch dropout (timm / open_clip flavour)."""
        p = self.num_prefix_tokens
        prefix, patches = x[:, :p], x[:, p:]
        b, n = patches.shape[0], patches.shape[1]
        num_keep = max(1, int(n * (1.0 - self.prob)))
        if self.flavour == "timm":
            idx = torch.argsort(torch.randn(b, n, device=x.device), dim=-1)[:, :num_keep]
            if self.ordered:
                idx = idx.sort(dim=-1)[0]
        else:
            idx = torch.randn(b, n).topk(num_keep, dim=-1).indices.to(x.device)
        patches = patches.gather(1, idx[:, :, None].expand(-1, -1, x.shape[2]))
        return torch.cat([prefix, patches], dim=1), idx

    def _grid(self, n: int, state: MaskingState) -> Optional[Tuple[int, int]]:
        if state.grid is not None:
            return state.grid
        if self.grid is not None and self.grid[0] * self.grid[1] == n:
            return self.grid
        return None                                      # square, checked by the op

    def _masked(self, x: Tensor, state: MaskingState) -> Tuple[Tensor, Tensor]:
        """The ``masking`` block's attentive or random selection (eager only)."""
        if isinstance(x, torch.fx.Proxy):
            raise RuntimeError("torch.fx cannot trace a masked forward (the graph would keep one step's "
                               "scores); trace outside masking, with AttentivePatchDropout as a leaf module")
        p = self.num_prefix_tokens
        grid = self._grid(x.shape[1] - p, state)
        if state.mode == "attentive":
            scores = state.scores.to(x.device)
            boxes = None if state.boxes is None else state.boxes.to(x.device)
            kept, idx = attentive_mask(x, scores, state.keep, num_prefix_tokens=p, grid=grid,
                                       block=state.block, boxes=boxes)
        else:
            kept, idx = random_mask(x, state.keep, num_prefix_tokens=p, block=state.block, grid=grid,
                                    generator=state.generator)
        state.indices, state.tokens, state.calls = idx, kept.shape[1], state.calls + 1
        return kept, idx

    def forward_with_indices(self, x: Tensor) -> Tuple[Tensor, Optional[Tensor]]:
        """x [B, P+N, D] -> (kept [B, P+n, D], idx [B, n] int64, or None when every token is kept)."""
        if not self.training:
            return x, None
        if not torch.jit.is_scripting():
            state = self._masking
            if state is not None:
                return self._masked(x, state)
        if self.prob == 0.0:
            return x, None
        return self._patch_dropout(x)

    def forward(self, x: Tensor) -> Tensor:
        """x [B, P+N, D] -> kept [B, P+n, D]."""
        return self.forward_with_indices(x)[0]


class AttentivePatchDropoutWithIndices(AttentivePatchDropout):
    """AttentivePatchDropout with the call signature of timm's ``PatchDropoutWithIndices``:
    returns (kept [B, P+n, D], idx [B, n] or None)."""

    def forward(self, x: Tensor) -> Tuple[Tensor, Optional[Tensor]]:
        return self.forward_with_indices(x)


def _patched_modules(model: nn.Module):
    scripted = [name for name, m in model.named_modules() if isinstance(m, torch.jit.ScriptModule)
                and m.original_name in ("AttentivePatchDropout", "AttentivePatchDropoutWithIndices")]
    if scripted:
        name = getattr(model, "original_name", type(model).__name__)
        raise RuntimeError(f"masking is eager-only: {name} holds a TorchScript AttentivePatchDropout "
                           f"({scripted[0] or 'the model itself'}); mask the eager model, or compile it "
                           "with torch.compile")
    return [m for m in model.modules() if isinstance(m, AttentivePatchDropout)]


@contextlib.contextmanager
def masking(model: nn.Module, scores: Optional[Tensor] = None, boxes: Optional[Tensor] = None,
            keep=0.5, block: int = 1, *, mode: str = "attentive", grid: Optional[Sequence[int]] = None,
            score_grid: Optional[Sequence[int]] = None,
            generator: Optional[torch.Generator] = None) -> Iterator[MaskingState]:
    """Masked forwards of a patched ``model`` (or its vision tower) inside the block.

    mode "attentive": ``scores`` [Bs, N] or [Bs, Hs, Ws] (from EMAScorer; ``score_grid`` reshapes a
    flat non-square [Bs, Hs*Ws]), optional ``boxes`` [V*Bs, 4] (y0, x0, h, w) of each online view in
    the scores' frame, rows view-major. mode "random": FLIP's uniform selection (``generator``).
    ``keep``: an int count of units, or a fraction; ``block``: b x b selection units; ``grid``: the
    online (Hg, Wg) when the patched module cannot know it. Semantics as ``attentive_mask``.
    Yields the MaskingState (``.indices``, ``.tokens`` of the last forward). Detached on exit.
    """
    if mode not in MODES:
        raise ValueError(f"mode={mode!r}: expected one of {MODES}")
    if mode == "attentive" and scores is None:
        raise ValueError("mode='attentive' needs scores [Bs, N] or [Bs, Hs, Ws] (e.g. from EMAScorer)")
    if mode == "random" and (scores is not None or boxes is not None):
        raise ValueError("mode='random' takes no scores or boxes")
    if scores is not None and score_grid is not None:
        scores = scores.reshape(scores.shape[0], int(score_grid[0]), int(score_grid[1]))
    modules = _patched_modules(model)
    if not modules:
        raise ValueError(f"{type(model).__name__} has no AttentivePatchDropout; patch it first with "
                         "patch_timm_vit(model), patch_open_clip(model) or patch_hf_clip(model)")
    state = MaskingState(mode=mode, keep=keep, block=block, scores=scores, boxes=boxes,
                         grid=None if grid is None else (int(grid[0]), int(grid[1])), generator=generator)
    previous = [m._masking for m in modules]
    for m in modules:
        m._masking = state
    try:
        yield state
    finally:
        for m, prev in zip(modules, previous):
            m._masking = prev


def patch_timm_vit(model: nn.Module) -> nn.Module:
    """Replace ``model.patch_drop`` of a timm VisionTransformer or Eva (EVA-CLIP, EVA-02) with an
    AttentivePatchDropout (same prob / prefix / ordering); in place, idempotent. Returns ``model``.
    Eva gets the WithIndices flavour (its ``patch_drop`` may be None): Eva gathers its rope
    embedding with the kept indices, so the kept tokens keep their rope positions."""
    if not _models.is_timm_vit(model):
        raise TypeError(f"{type(model).__name__} is not a timm VisionTransformer or Eva (no .patch_drop)")
    if not isinstance(model.patch_drop, AttentivePatchDropout):
        grid = tuple(model.patch_embed.grid_size)
        if _models.is_eva(model):
            drop = model.patch_drop
            model.patch_drop = AttentivePatchDropoutWithIndices(
                getattr(drop, "prob", 0.0), model.num_prefix_tokens, getattr(drop, "ordered", False), grid=grid)
        else:
            model.patch_drop = AttentivePatchDropout.from_timm(model.patch_drop, model.num_prefix_tokens, grid=grid)
        model.patch_drop.train(model.training)          # a model patched in eval mode stays in eval mode
    return model


def patch_open_clip(model: nn.Module) -> nn.Module:
    """Replace the ``patch_dropout`` of an open_clip VisionTransformer (or of a CLIP model's
    ``.visual``) with an AttentivePatchDropout (same prob); in place, idempotent. Returns ``model``.
    A CLIP model with a timm tower (``.visual.trunk``, e.g. SigLIP) gets ``patch_timm_vit(trunk)``."""
    tower, kind = _models.vision_tower(model)
    if kind == _models.TIMM and tower is not model:
        patch_timm_vit(tower)
        return model
    if kind != _models.OPEN_CLIP:
        raise TypeError(f"{type(model).__name__} is not an open_clip VisionTransformer or CLIP model")
    if not isinstance(tower.patch_dropout, AttentivePatchDropout):
        tower.patch_dropout = AttentivePatchDropout.from_open_clip(tower.patch_dropout, grid=tuple(tower.grid_size))
        tower.patch_dropout.train(tower.training)
    return model

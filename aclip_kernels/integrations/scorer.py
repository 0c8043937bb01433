"""EMAScorer: A-CLIP's [CLS]-attention patch scores from a fast-attention ViT, without attention maps.

The EMA ViT runs its own forward (PyTorch SDPA, or FlashAttention / xFormers when asked). Hooks on
the scored blocks compute only the [CLS] row of each block's attention with
``aclip_kernels.cls_attention`` and add it into one [B, N] float32 buffer:

- timm ``Attention``: a forward hook on the fused ``qkv`` projection takes q of the [CLS] token and
  the keys (strided views of the projection's output, no copy; q_norm / k_norm applied).
- open_clip ``nn.MultiheadAttention`` (q and k never exposed): a pre-hook takes the block's
  normalised input h [B, T, D] and uses q_cls . (W_k h_t + b_k) = (W_k^T q_cls) . h_t + q_cls . b_k.
  The last term is the same for every key t, so it cancels in the softmax; the logits are the
  per-head queries W_k^T q_cls [B, H, D] against h itself ([B, H, T] logits, one batched GEMM), and
  K is never projected.
- transformers ``CLIPAttention`` / ``SiglipAttention``: forward hooks on ``q_proj`` and ``k_proj``.
- timm ``EvaAttention`` (bias outside its Linear, rope): a pre-hook recomputes q_cls and the keys,
  rotated by the block's rope (so kept tokens keep their rope positions).
- attention-pooling probes (no [CLS]): the probe's query row against the pooled tokens (timm
  ``AttentionPoolLatent`` via its ``q`` / ``kv`` Linears, the SigLIP head's MHA as above).

Scores are the mean over the scored layers and all heads of softmax(q_cls k^T * scale)[P:], i.e.
``attn[:, :, 0, P:].mean(heads)`` averaged over layers as in the official A-CLIP code.
"""
from __future__ import annotations

import contextlib
from typing import Iterator, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..ops import cls_attention
from . import _models
from ._models import HF, TIMM
from .attention import attention_kernel, fast_attention
from .hf import siglip2_inputs

__all__ = ["EMAScorer"]


class _Accumulator:
    """The [B, N] float32 scores of one forward, summed over the scored blocks."""

    def __init__(self, prefix: int, backend: Optional[str]):
        self.prefix, self.backend = prefix, backend
        self.scores: Optional[Tensor] = None
        self.layers = 0

    def add(self, q: Tensor, k: Tensor, scale: float) -> None:
        self.scores = cls_attention(q, k, num_prefix_tokens=self.prefix, scale=scale, prior=self.scores,
                                    backend=self.backend).float()
        self.layers += 1


def _query_row(q: Tensor, rule: str, norm: Optional[nn.Module] = None) -> Tensor:
    """q [B, T, H, Dh] (any strides) -> the scoring query [B, H, Dh]: the [CLS] token's ("cls") or
    the token mean of the queries as the attention uses them ("mean", the [CLS]-free rule)."""
    if rule == "cls":
        q = q[:, 0]
        return q if norm is None else norm(q)
    return (q if norm is None else norm(q)).mean(dim=1)


def _timm_hook(attn: nn.Module, acc: _Accumulator, rule: str = "cls"):
    heads, dh = attn.num_heads, attn.head_dim
    q_norm = None if isinstance(attn.q_norm, nn.Identity) else attn.q_norm
    k_norm = None if isinstance(attn.k_norm, nn.Identity) else attn.k_norm

    def hook(linear, inputs, qkv: Tensor) -> None:          # qkv [B, T, 3*H*Dh]
        b, t = qkv.shape[:2]
        qkv = qkv.detach().view(b, t, 3, heads, dh)
        q = _query_row(qkv[:, :, 0], rule, q_norm)           # [B, H, Dh]
        k = qkv[:, :, 1].transpose(1, 2)                     # [B, H, T, Dh], a strided view
        if k_norm is not None:
            k = k_norm(k)
        acc.add(q, k, float(attn.scale))
    return hook


def _eva_pre_hook(attn: nn.Module, acc: _Accumulator, rule: str = "cls"):
    """timm EvaAttention: its qkv projection adds the bias outside the Linear (so no Linear hook
    sees q and k) and rotates q / k of the patches by the block's rope. The pre-hook recomputes
    the scoring query row and the keys from the block's input: one [T, D] x [D, D] GEMM per layer."""
    from timm.layers import apply_rot_embed_cat             # timm is optional; an Eva model means it is here
    heads, dh = attn.num_heads, attn.head_dim
    d = heads * dh

    def project(h: Tensor, which: int) -> Tensor:            # which 0: q, 1: k -> [B, T', H, Dh]
        if attn.qkv is not None:
            bias = None if attn.q_bias is None else (attn.q_bias, attn.k_bias)[which]
            out = F.linear(h, attn.qkv.weight[which * d:(which + 1) * d], bias)
        else:
            out = (attn.q_proj, attn.k_proj)[which](h)
        return out.view(h.shape[0], h.shape[1], heads, dh)

    def rotate(t: Tensor, rope: Optional[Tensor]) -> Tensor:  # t [B, H, T, Dh]
        if rope is None:
            return t
        npt = attn.num_prefix_tokens
        half = getattr(attn, "rotate_half", False)
        return torch.cat([t[:, :, :npt], apply_rot_embed_cat(t[:, :, npt:], rope, half=half)], dim=2)

    def hook(module, args, kwargs) -> None:
        h = (args[0] if args else kwargs["x"]).detach()     # [B, T, D], the block's normalised input
        rope = args[1] if len(args) > 1 else kwargs.get("rope")
        k = rotate(attn.k_norm(project(h, 1).transpose(1, 2)), rope)
        if rule == "cls":                                    # the [CLS] query: a prefix token, not rotated
            q = attn.q_norm(project(h[:, :1], 0))[:, 0]
        else:
            q = rotate(attn.q_norm(project(h, 0).transpose(1, 2)), rope).mean(dim=2)
        acc.add(q, k, float(attn.scale))
    return hook


def _mha_pre_hook(mha: nn.MultiheadAttention, acc: _Accumulator, rule: str = "cls"):
    d, heads = mha.embed_dim, mha.num_heads
    dh = d // heads

    def hook(module, args, kwargs) -> None:
        query = args[0] if args else kwargs["query"]
        key = args[1] if len(args) > 1 else kwargs.get("key", query)
        # [B, T, D]: the keys' input (the block's normalised input; the pooled features for a probe)
        h = (key if mha.batch_first else key.transpose(0, 1)).detach()
        x = (query if mha.batch_first else query.transpose(0, 1)).detach()
        b, t, _ = h.shape
        w, bias = mha.in_proj_weight, mha.in_proj_bias
        with torch.autocast(h.device.type, enabled=False):       # the scoring row in fp32
            hf = h.float()
            row = x[:, 0] if rule == "cls" else x.mean(dim=1)      # q is linear in x: mean commutes
            q = F.linear(row.float(), w[:d].float(), None if bias is None else bias[:d].float())
            # (W_k^T q) per head: [B, H, D]; q . b_k is constant over the keys and cancels
            q_eff = torch.einsum("bhe,hed->bhd", q.view(b, heads, dh), w[d:2 * d].float().view(heads, dh, d))
            # logits [B, H, T] = q_eff . h_t: one batched GEMM (3x faster on CPU than having the
            # kernel walk a stride-0 [B, H, T, D] view of h); cls_attention then does the softmax,
            # the head mean and the accumulation, the logits passed as 1-d keys with a unit query.
            logits = torch.bmm(q_eff, hf.transpose(1, 2))
        acc.add(logits.new_ones(b, heads, 1), logits[..., None], dh ** -0.5)
    return hook


def _hf_hooks(attn: nn.Module, acc: _Accumulator, rule: str = "cls"):
    """transformers CLIPAttention / SiglipAttention: forward hooks on q_proj (keeps the scoring
    query row) and k_proj (adds the row's attention over the keys, a strided view of its output)."""
    heads, dh = attn.num_heads, attn.head_dim
    slot = []

    def q_hook(linear, inputs, q: Tensor) -> None:        # q [B, T, H*Dh]
        slot[:] = [_query_row(q.detach().view(q.shape[0], q.shape[1], heads, dh), rule)]

    def k_hook(linear, inputs, k: Tensor) -> None:
        if not slot:
            raise RuntimeError(f"{type(attn).__name__} ran k_proj before q_proj; the scorer expects q first")
        k = k.detach().view(k.shape[0], k.shape[1], heads, dh).transpose(1, 2)
        acc.add(slot.pop(), k, float(attn.scale))
    return q_hook, k_hook


def _latent_pool_hooks(pool: nn.Module, acc: _Accumulator):
    """timm AttentionPoolLatent: each latent query's attention over the pooled tokens (q hook keeps
    the latent queries, kv hook adds one row per latent)."""
    heads, dh = pool.num_heads, pool.head_dim
    slot = []

    def q_hook(linear, inputs, q: Tensor) -> None:        # q [B, L, H*Dh]
        slot[:] = [pool.q_norm(q.detach().view(q.shape[0], q.shape[1], heads, dh).transpose(1, 2))]

    def kv_hook(linear, inputs, kv: Tensor) -> None:      # kv [B, T, 2*H*Dh]
        b, t = kv.shape[:2]
        k = pool.k_norm(kv.detach().view(b, t, 2, heads, dh)[:, :, 0].transpose(1, 2))
        q = slot.pop()                                       # [B, H, L, Dh]
        for i in range(q.shape[2]):
            acc.add(q[:, :, i], k, float(pool.scale))
    return q_hook, kv_hook


def _size_pair(value, name: str) -> Tuple[int, int]:
    pair = (value, value) if isinstance(value, int) else tuple(int(v) for v in value)
    if len(pair) != 2 or min(pair) <= 0:
        raise ValueError(f"{name}={value!r} must be a positive int or (height, width)")
    return pair


SOURCES = ("auto", "cls", "probe", "mean-query", "probe+mean-query")


class EMAScorer:
    """A-CLIP patch scores of a ViT (the EMA encoder), from its own fast attention, without maps.

    ``model``: a timm VisionTransformer / Eva, an open_clip VisionTransformer or CLIP model (its
    ``.visual``, or the timm ``.visual.trunk`` of e.g. SigLIP), or a transformers CLIP / SigLIP /
    SigLIP2 model or vision model (its vision model is run, with ``pixel_values``).
    ``source``: what scores the patches.
    - "cls": the [CLS] row of each scored layer's attention (A-CLIP's definition);
    - "probe": the attention-pooling probe's attention over the patches (timm ``attn_pool``,
      transformers SigLIP head), mean over heads (and latent queries);
    - "mean-query": the [CLS]-free per-layer rule: the attention row of the token-mean query;
    - "probe+mean-query": the mean of the two;
    - "auto" (default): "cls" when the model has a [CLS] token, else "probe" when it has a probe,
      else "mean-query". docs/design.md, "Scoring without a [CLS] token", says why.
    ``layers`` (the per-layer rules): "all" (mean over every block, the official definition),
    "last", or a sequence of block indices. ``attn``: "sdpa" (the model's own attention), "flash"
    (flash-attn) or "xformers" (timm Attention / open_clip only); ImportError naming the package
    when it is missing. ``resolution`` (int or (H, W)) or ``downsample`` (a factor > 1): the EMA
    sees images resized to that size, with positional embeddings interpolated ("efficient"
    A-CLIP); the score grid then differs from the online grid. ``backend`` is passed to
    ``cls_attention``. ``micro_batch`` (int): run the forward on at most that many images at a
    time. The peak activation memory is then that of a ``micro_batch`` forward, whatever the
    batch: the scores need only their [B, N] buffer, so nothing but the (small) outputs outlives a
    micro-batch. Each image's scores and output are the model's own for that micro-batch (equal
    to the full-batch ones up to the GEMM's batch-size-dependent rounding).

    ``scorer(images)`` -> scores [B, N] float32, ``forward_with_output(images)`` ->
    (model output, scores); ``scorer.grid`` is the (Hs, Ws) score grid of the last call.
    Runs under ``torch.no_grad()``; the model output equals the model's own output bit for bit.
    """

    def __init__(self, model: nn.Module, layers: Union[str, Sequence[int]] = "all", attn: str = "sdpa",
                 resolution=None, *, downsample: Optional[float] = None, backend: Optional[str] = None,
                 micro_batch: Optional[int] = None, source: str = "auto"):
        self.tower, self.kind = _models.vision_tower(model)
        self.model = _models.runner(model, self.tower)
        all_blocks = _models.blocks(self.tower, self.kind)
        if layers == "all":
            self.layer_indices = list(range(len(all_blocks)))
        elif layers == "last":
            self.layer_indices = [len(all_blocks) - 1]
        elif not isinstance(layers, str) and len(layers) > 0:
            self.layer_indices = sorted({int(i) % len(all_blocks) for i in layers})
        else:
            raise ValueError(f"layers={layers!r}: expected 'all', 'last' or a sequence of block indices")
        self.attentions = [_models.attention_of(blk, self.kind, i) for i, blk in enumerate(all_blocks)]
        self.probe = _models.probe_of(self.tower, self.kind)
        self.source = self._resolve_source(source)
        if attn != "sdpa" and (self.kind == HF or self._attention_type() == "EvaAttention"):
            raise ValueError(f"attn={attn!r} runs timm Attention / open_clip attention only; "
                             f"{type(self.tower).__name__} scores with attn='sdpa' (its own attention)")
        self.kernel = attention_kernel(attn)
        self.attn = attn
        if resolution is not None and downsample is not None:
            raise ValueError("give resolution or downsample, not both")
        self.resolution = None if resolution is None else _size_pair(resolution, "resolution")
        if downsample is not None and not float(downsample) > 0:
            raise ValueError(f"downsample={downsample!r} must be a positive factor")
        self.downsample = None if downsample is None else float(downsample)
        self.prefix = _models.prefix_tokens(self.tower, self.kind)
        self.probe_prefix = self.prefix if getattr(self.tower, "pool_include_prefix", self.kind == HF) else 0
        self.patch = _models.patch_size(self.tower, self.kind)
        self.backend = backend
        if micro_batch is not None and (isinstance(micro_batch, bool) or not isinstance(micro_batch, int)
                                        or micro_batch <= 0):
            raise ValueError(f"micro_batch={micro_batch!r} must be a positive int or None")
        self.micro_batch = micro_batch
        self.grid: Optional[Tuple[int, int]] = None

    def _attention_type(self) -> str:
        return type(self.attentions[0]).__name__

    def _resolve_source(self, source: str) -> str:
        if source not in SOURCES:
            raise ValueError(f"source={source!r}: expected one of {SOURCES}")
        has_cls = _models.has_class_token(self.tower, self.kind)
        if source == "auto":
            return "cls" if has_cls else "probe" if self.probe is not None else "mean-query"
        if source == "cls" and not has_cls:
            raise ValueError(f"source='cls': {type(self.tower).__name__} has no [CLS] token; use source="
                             "'probe' (attention-pooled models), 'mean-query' or 'probe+mean-query'")
        if "probe" in source and self.probe is None:
            raise ValueError(f"source={source!r}: {type(self.tower).__name__} has no attention-pooling probe "
                             "(timm attn_pool / a SigLIP head); use source='cls' or 'mean-query'")
        return source

    def _input_size(self, images: Tensor) -> Tuple[int, int]:
        h, w = images.shape[-2:]
        if self.resolution is not None:
            return self.resolution
        if self.downsample is not None:
            return (max(self.patch[0], round(h / self.downsample)), max(self.patch[1], round(w / self.downsample)))
        return (h, w)

    @contextlib.contextmanager
    def _hooks(self, acc: _Accumulator, probe_acc: _Accumulator) -> Iterator[None]:
        handles = []
        rule = "cls" if self.source == "cls" else "mean"
        try:
            for i in self.layer_indices if self.source != "probe" else []:
                attn = self.attentions[i]
                if self.kind == HF:
                    q_hook, k_hook = _hf_hooks(attn, acc, rule)
                    handles += [attn.q_proj.register_forward_hook(q_hook), attn.k_proj.register_forward_hook(k_hook)]
                elif type(attn).__name__ == "EvaAttention":
                    handles.append(attn.register_forward_pre_hook(_eva_pre_hook(attn, acc, rule), with_kwargs=True))
                elif self.kind == TIMM:
                    handles.append(attn.qkv.register_forward_hook(_timm_hook(attn, acc, rule)))
                else:
                    handles.append(attn.register_forward_pre_hook(_mha_pre_hook(attn, acc, rule), with_kwargs=True))
            if "probe" in self.source:
                if isinstance(self.probe, nn.MultiheadAttention):
                    handles.append(self.probe.register_forward_pre_hook(_mha_pre_hook(self.probe, probe_acc),
                                                                        with_kwargs=True))
                else:
                    q_hook, kv_hook = _latent_pool_hooks(self.probe, probe_acc)
                    handles += [self.probe.q.register_forward_hook(q_hook),
                                self.probe.kv.register_forward_hook(kv_hook)]
            yield
        finally:
            for handle in handles:
                handle.remove()

    def forward_with_output(self, images: Tensor):
        """images [B, 3, H, W] -> (the model's output, scores [B, N] float32, higher = keep)."""
        if not isinstance(images, Tensor) or images.dim() != 4:
            raise ValueError(f"images must be [B, 3, H, W]; got {getattr(images, 'shape', type(images).__name__)}")
        size = self._input_size(images)
        grid = (size[0] // self.patch[0], size[1] // self.patch[1])
        if self.micro_batch is None or images.shape[0] <= self.micro_batch:
            output, scores = self._score(images, size, grid)
        else:
            parts = [self._score(chunk, size, grid) for chunk in images.split(self.micro_batch)]
            output = _concat([out for out, _ in parts])
            scores = torch.cat([sc for _, sc in parts])
        self.grid = grid
        return output, scores

    def _run(self, images: Tensor, grid: Tuple[int, int]):
        if self.kind != HF:
            return self.model(images)
        if self.tower.config.model_type == "siglip2_vision_model":
            return self.model(**siglip2_inputs(images, self.patch[0]))
        return self.model(pixel_values=images,
                          interpolate_pos_encoding=grid != _models.native_grid(self.tower, self.kind))

    def _score(self, images: Tensor, size: Tuple[int, int], grid: Tuple[int, int]):
        if size != tuple(images.shape[-2:]):
            images = F.interpolate(images, size=size, mode="bilinear", align_corners=False, antialias=True)
        acc, probe_acc = _Accumulator(self.prefix, self.backend), _Accumulator(self.probe_prefix, self.backend)
        with torch.no_grad(), self._hooks(acc, probe_acc), _models.input_grid(self.tower, self.kind, grid), \
                fast_attention(self.attentions, self.kind, self.kernel):
            output = self._run(images, grid)
        expected = 0 if self.source == "probe" else len(self.layer_indices)
        if acc.layers != expected or ("probe" in self.source and probe_acc.layers == 0):
            raise RuntimeError(f"scored {acc.layers} blocks but expected {expected}; "
                               "is the model running its blocks (and its probe) more or less than once?")
        parts = []
        if self.source != "probe":
            parts.append(acc.scores.div_(acc.layers))
        if "probe" in self.source:
            parts.append(probe_acc.scores.div_(probe_acc.layers))
        scores = parts[0] if len(parts) == 1 else parts[0].add_(parts[1]).mul_(0.5)
        if scores.shape[1] != grid[0] * grid[1]:
            raise RuntimeError(f"the model saw {scores.shape[1]} patch tokens, not the {grid} grid of its "
                               "input; put the EMA model in eval mode (patch dropout must be off)")
        return output, scores

    def __call__(self, images: Tensor) -> Tensor:
        """images [B, 3, H, W] -> scores [B, N] float32 on the grid ``self.grid``."""
        return self.forward_with_output(images)[1]

    def __repr__(self) -> str:
        return (f"EMAScorer({type(self.tower).__name__} [{self.kind}], source={self.source!r}, "
                f"layers={self.layer_indices}, attn={self.attn!r}, resolution={self.resolution}, "
                f"downsample={self.downsample}, micro_batch={self.micro_batch})")


def _concat(outputs: list):
    """Joins the per-micro-batch model outputs (a tensor, or a tuple / list of tensors) along dim 0."""
    first = outputs[0]
    if isinstance(first, Tensor):
        return torch.cat(outputs)
    if isinstance(first, (tuple, list)) and all(isinstance(t, Tensor) for t in first):
        return type(first)(torch.cat(ts) for ts in zip(*outputs))
    if isinstance(first, dict) and all(isinstance(t, Tensor) for t in first.values()):   # transformers ModelOutput
        return type(first)(**{key: torch.cat([out[key] for out in outputs]) for key in first})
    raise TypeError(f"micro_batch: cannot join model outputs of type {type(first).__name__}; "
                    "use micro_batch=None")

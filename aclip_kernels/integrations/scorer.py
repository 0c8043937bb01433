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
from ._models import TIMM
from .attention import attention_kernel, fast_attention

__all__ = ["EMAScorer"]


class _Accumulator:
    """The [B, N] float32 scores of one forward, summed over the scored blocks."""

    def __init__(self, prefix: int, backend: Optional[str]):
        self.prefix, self.backend = prefix, backend
        self.scores: Optional[Tensor] = None
        self.layers = 0

    def add(self, q: Tensor, k: Tensor, scale: float) -> None:
        self.scores = cls_attention(q, k, num_prefix_tokens=self.prefix, scale=scale, prior=self.scores,
                                    backend=self.backend)
        self.layers += 1


def _timm_hook(attn: nn.Module, acc: _Accumulator):
    heads, dh = attn.num_heads, attn.head_dim
    q_norm = None if isinstance(attn.q_norm, nn.Identity) else attn.q_norm
    k_norm = None if isinstance(attn.k_norm, nn.Identity) else attn.k_norm

    def hook(linear, inputs, qkv: Tensor) -> None:          # qkv [B, T, 3*H*Dh]
        b, t = qkv.shape[:2]
        qkv = qkv.detach().view(b, t, 3, heads, dh)
        q = qkv[:, 0, 0]                                     # [B, H, Dh], the [CLS] query
        k = qkv[:, :, 1].transpose(1, 2)                     # [B, H, T, Dh], a strided view
        if q_norm is not None:
            q = q_norm(q)
        if k_norm is not None:
            k = k_norm(k)
        acc.add(q, k, float(attn.scale))
    return hook


def _mha_pre_hook(mha: nn.MultiheadAttention, acc: _Accumulator):
    d, heads = mha.embed_dim, mha.num_heads
    dh = d // heads

    def hook(module, args, kwargs) -> None:
        h = args[0] if args else kwargs["query"]
        h = (h if mha.batch_first else h.transpose(0, 1)).detach()     # [B, T, D], normalised input
        b, t, _ = h.shape
        w, bias = mha.in_proj_weight, mha.in_proj_bias
        with torch.autocast(h.device.type, enabled=False):       # the [CLS] row in fp32
            hf = h.float()
            q = F.linear(hf[:, 0], w[:d].float(), None if bias is None else bias[:d].float())
            # (W_k^T q_cls) per head: [B, H, D]; q_cls . b_k is constant over the keys and cancels
            q_eff = torch.einsum("bhe,hed->bhd", q.view(b, heads, dh), w[d:2 * d].float().view(heads, dh, d))
            # logits [B, H, T] = q_eff . h_t: one batched GEMM (3x faster on CPU than having the
            # kernel walk a stride-0 [B, H, T, D] view of h); cls_attention then does the softmax,
            # the head mean and the accumulation, the logits passed as 1-d keys with a unit query.
            logits = torch.bmm(q_eff, hf.transpose(1, 2))
        acc.add(logits.new_ones(b, heads, 1), logits[..., None], dh ** -0.5)
    return hook


def _size_pair(value, name: str) -> Tuple[int, int]:
    pair = (value, value) if isinstance(value, int) else tuple(int(v) for v in value)
    if len(pair) != 2 or min(pair) <= 0:
        raise ValueError(f"{name}={value!r} must be a positive int or (height, width)")
    return pair


class EMAScorer:
    """[CLS]-attention scores of a timm / open_clip ViT (the EMA encoder), with its fast attention.

    ``model``: a timm VisionTransformer, an open_clip VisionTransformer, or an open_clip CLIP model
    (its ``.visual`` is used). ``layers``: "all" (mean over every block, the official definition),
    "last", or a sequence of block indices. ``attn``: "sdpa" (the model's own attention), "flash"
    (flash-attn) or "xformers"; ImportError naming the package when it is missing.
    ``resolution`` (int or (H, W)) or ``downsample`` (a factor > 1): the EMA sees images resized to
    that size, with positional embeddings interpolated ("efficient" A-CLIP); the score grid then
    differs from the online grid. ``backend`` is passed to ``cls_attention``.
    ``micro_batch`` (int): run the forward on at most that many images at a time. The peak
    activation memory is then that of a ``micro_batch`` forward, whatever the batch: the scores
    need only their [B, N] buffer, so nothing but the (small) outputs outlives a micro-batch.
    Each image's scores and output are the model's own for that micro-batch (equal to the
    full-batch ones up to the GEMM's batch-size-dependent rounding).

    ``scorer(images)`` -> scores [B, N] float32, ``forward_with_output(images)`` ->
    (model output, scores); ``scorer.grid`` is the (Hs, Ws) score grid of the last call.
    Runs under ``torch.no_grad()``; the model output equals the model's own output bit for bit.
    """

    def __init__(self, model: nn.Module, layers: Union[str, Sequence[int]] = "all", attn: str = "sdpa",
                 resolution=None, *, downsample: Optional[float] = None, backend: Optional[str] = None,
                 micro_batch: Optional[int] = None):
        self.model = model
        self.tower, self.kind = _models.vision_tower(model)
        if self.kind != TIMM and self.tower is not model:
            self.model = self.tower                      # a CLIP model: score and run its .visual
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
        self.kernel = attention_kernel(attn)
        self.attn = attn
        if resolution is not None and downsample is not None:
            raise ValueError("give resolution or downsample, not both")
        self.resolution = None if resolution is None else _size_pair(resolution, "resolution")
        if downsample is not None and not float(downsample) > 0:
            raise ValueError(f"downsample={downsample!r} must be a positive factor")
        self.downsample = None if downsample is None else float(downsample)
        self.prefix = _models.num_prefix_tokens(self.tower, self.kind)
        self.patch = _models.patch_size(self.tower, self.kind)
        self.backend = backend
        if micro_batch is not None and (isinstance(micro_batch, bool) or not isinstance(micro_batch, int)
                                        or micro_batch <= 0):
            raise ValueError(f"micro_batch={micro_batch!r} must be a positive int or None")
        self.micro_batch = micro_batch
        self.grid: Optional[Tuple[int, int]] = None

    def _input_size(self, images: Tensor) -> Tuple[int, int]:
        h, w = images.shape[-2:]
        if self.resolution is not None:
            return self.resolution
        if self.downsample is not None:
            return (max(self.patch[0], round(h / self.downsample)), max(self.patch[1], round(w / self.downsample)))
        return (h, w)

    @contextlib.contextmanager
    def _hooks(self, acc: _Accumulator) -> Iterator[None]:
        handles = []
        try:
            for i in self.layer_indices:
                attn = self.attentions[i]
                if self.kind == TIMM:
                    handles.append(attn.qkv.register_forward_hook(_timm_hook(attn, acc)))
                else:
                    handles.append(attn.register_forward_pre_hook(_mha_pre_hook(attn, acc), with_kwargs=True))
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

    def _score(self, images: Tensor, size: Tuple[int, int], grid: Tuple[int, int]):
        if size != tuple(images.shape[-2:]):
            images = F.interpolate(images, size=size, mode="bilinear", align_corners=False, antialias=True)
        acc = _Accumulator(self.prefix, self.backend)
        with torch.no_grad(), self._hooks(acc), _models.input_grid(self.tower, self.kind, grid), \
                fast_attention(self.attentions, self.kind, self.kernel):
            output = self.model(images)
        if acc.layers != len(self.layer_indices):
            raise RuntimeError(f"scored {acc.layers} blocks but expected {len(self.layer_indices)}; "
                               "is the model running its blocks more or less than once?")
        scores = acc.scores.div_(acc.layers)
        if scores.shape[1] != grid[0] * grid[1]:
            raise RuntimeError(f"the model saw {scores.shape[1]} patch tokens, not the {grid} grid of its "
                               "input; put the EMA model in eval mode (patch dropout must be off)")
        return output, scores

    def __call__(self, images: Tensor) -> Tensor:
        """images [B, 3, H, W] -> scores [B, N] float32 on the grid ``self.grid``."""
        return self.forward_with_output(images)[1]

    def __repr__(self) -> str:
        return (f"EMAScorer({type(self.tower).__name__} [{self.kind}], layers={self.layer_indices}, "
                f"attn={self.attn!r}, resolution={self.resolution}, downsample={self.downsample}, "
                f"micro_batch={self.micro_batch})")


def _concat(outputs: list):
    """Joins the per-micro-batch model outputs (a tensor, or a tuple / list of tensors) along dim 0."""
    first = outputs[0]
    if isinstance(first, Tensor):
        return torch.cat(outputs)
    if isinstance(first, (tuple, list)) and all(isinstance(t, Tensor) for t in first):
        return type(first)(torch.cat(ts) for ts in zip(*outputs))
    raise TypeError(f"micro_batch: cannot join model outputs of type {type(first).__name__}; "
                    "use micro_batch=None")

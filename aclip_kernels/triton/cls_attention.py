"""cls_attention in Triton: one program per batch row; per head, one pass over the keys in tiles
(logits to a [T] scratch row, online max and sum), then the probabilities of the patch keys are
added into the output row; at the end the row is divided by H and the prior is added.

q [B, H, Dh], k [B, H, T, Dh] (any strides, fp32/fp16/bf16/fp64) -> [B, N] float32 (float64 for
float64 inputs), accumulating in the output's dtype. Extra memory: the [B, T] logits scratch.
Offsets are int64 products (a sequence-first packed qkv at large B passes 2**31 elements). The
autotuner's key: N, Dh, H and the batch rounded up to a power of two (``rows_bucket``).
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._common import autotune, next_pow2, wrap_triton

__all__ = ["launch_cls_attention", "cls_attention_row"]


@triton.jit
def cls_attention_row(q_row, k_row, prior_row, out_row, logit_row, H, T, P, Dh,
                      sq1, sq2, sk1, sk2, sk3, sp1, scale,
                      HAS_PRIOR: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_DH: tl.constexpr):
    """out_row[n] = prior_row[n] + mean_h softmax_t(q_h . k_ht * scale)[P + n] for one batch row.

    out_row: [T - P] contiguous (its element type is the accumulation type); logit_row: [T] scratch.
    """
    acc_ty = out_row.dtype.element_ty
    n_patches = T - P
    offs_d = tl.arange(0, BLOCK_DH)
    dmask = offs_d < Dh
    # Every stride product in int64 (a sequence-first packed qkv passes 2**31 elements); the key
    # tile's pointers advance by BLOCK_T tokens per step.
    tile = tl.arange(0, BLOCK_T).to(tl.int64)[:, None] * sk2 + offs_d.to(tl.int64)[None, :] * sk3
    step = tl.full((), BLOCK_T, tl.int64) * sk2
    for h in range(H):
        q_head = q_row + (tl.full((), 0, tl.int64) + h) * sq1
        k_ptrs = k_row + (tl.full((), 0, tl.int64) + h) * sk1 + tile
        qh = tl.load(q_head + offs_d.to(tl.int64) * sq2, mask=dmask, other=0.0).to(acc_ty)
        top = tl.full((), float("-inf"), acc_ty)
        total = tl.full((), 0.0, acc_ty)
        for t0 in range(0, T, BLOCK_T):
            offs_t = t0 + tl.arange(0, BLOCK_T)
            tmask = offs_t < T
            kt = tl.load(k_ptrs, mask=tmask[:, None] & dmask[None, :], other=0.0).to(acc_ty)
            k_ptrs += step
            logit = tl.sum(kt * qh[None, :], axis=1) * scale
            logit = tl.where(tmask, logit, float("-inf"))
            tl.store(logit_row + offs_t, logit, mask=tmask)
            new_top = tl.maximum(top, tl.max(logit, axis=0))
            total = total * tl.exp(top - new_top) + tl.sum(tl.exp(logit - new_top), axis=0)
            top = new_top
        tl.debug_barrier()  # the logits stored above are read back by other threads
        for n0 in range(0, n_patches, BLOCK_T):
            offs_n = n0 + tl.arange(0, BLOCK_T)
            nmask = offs_n < n_patches
            logit = tl.load(logit_row + P + offs_n, mask=nmask, other=float("-inf"))
            prob = tl.exp(logit - top) / total
            prev = tl.load(out_row + offs_n, mask=nmask & (h > 0), other=0.0)
            tl.store(out_row + offs_n, prev + prob, mask=nmask)
        tl.debug_barrier()  # the next head overwrites the scratch
    for n0 in range(0, n_patches, BLOCK_T):
        offs_n = n0 + tl.arange(0, BLOCK_T)
        nmask = offs_n < n_patches
        mean = tl.load(out_row + offs_n, mask=nmask, other=0.0) / H
        if HAS_PRIOR:
            mean = tl.load(prior_row + offs_n.to(tl.int64) * sp1, mask=nmask, other=0.0).to(acc_ty) + mean
        tl.store(out_row + offs_n, mean, mask=nmask)


_CONFIGS = [triton.Config({"BLOCK_T": bt}, num_warps=w) for bt, w in ((128, 4), (32, 2), (64, 4), (256, 8))]


@autotune(_CONFIGS, key=["N", "Dh", "H", "rows_bucket"])
@triton.jit(do_not_specialize=["rows_bucket"])
def _cls_attention_kernel(q, k, prior, out, logits, H, T, P, N, Dh,
                          sq0, sq1, sq2, sk0, sk1, sk2, sk3, sp0, sp1, scale, rows_bucket,
                          HAS_PRIOR: tl.constexpr, BLOCK_DH: tl.constexpr, BLOCK_T: tl.constexpr):
    """Grid (B,): row b of out [B, N] from q [B, H, Dh], k [B, H, T, Dh], prior [B, N]."""
    b = tl.program_id(0).to(tl.int64)
    cls_attention_row(q + b * sq0, k + b * sk0, prior + b * sp0, out + b * N, logits + b * T,
                      H, T, P, Dh, sq1, sq2, sk1, sk2, sk3, sp1, scale,
                      HAS_PRIOR, BLOCK_T, BLOCK_DH)


def accumulation_dtype(q: Tensor) -> torch.dtype:
    return torch.float64 if q.dtype == torch.float64 else torch.float32


def launch_args(q: Tensor, k: Tensor, prior: Optional[Tensor], out: Tensor, logits: Tensor,
                num_prefix_tokens: int, scale: float) -> tuple:
    """The runtime arguments of ``_cls_attention_kernel`` (also used by the compile check)."""
    prior_t = out if prior is None else prior
    b, h, t, dh = k.shape
    return (q, k, prior_t, out, logits, h, t, num_prefix_tokens, t - num_prefix_tokens, dh,
            *q.stride(), *k.stride(), prior_t.stride(0), prior_t.stride(1), scale, next_pow2(b))


def launch_cls_attention(q: Tensor, k: Tensor, num_prefix_tokens: int, scale: float,
                         prior: Optional[Tensor]) -> Tensor:
    """q [B, H, Dh], k [B, H, T, Dh] (+ prior [B, N]) -> [B, N]: the launch behind the op
    ``aclip_kernels::cls_attention_triton`` (aclip_kernels/ops/cls_attention.py), which checks the arguments."""
    b, h, t, dh = k.shape
    n = t - num_prefix_tokens
    dtype = accumulation_dtype(q)
    out = torch.empty(b, n, dtype=dtype, device=q.device)
    logits = torch.empty(b, t, dtype=dtype, device=q.device)
    wrap_triton(_cls_attention_kernel)[(b,)](
        *launch_args(q, k, prior, out, logits, num_prefix_tokens, scale),
        HAS_PRIOR=prior is not None, BLOCK_DH=next_pow2(dh))
    return out

"""cls_attention in Triton, in the style of flash-decoding: one program per (image, head group).

q [B, H, Dh], k [B, H, T, Dh] (any strides, fp32/fp16/bf16/fp64) -> [B, N] float32 (float64 for
float64 inputs), N = T - P, accumulating in the output's dtype. All stride products are int64 (a
sequence-first packed qkv at large B passes 2**31 elements).

Program (b, g) takes the heads [g * hpg, (g + 1) * hpg) of image b (hpg heads per group):
  1. per key tile, one [BLOCK_T, BLOCK_H, BLOCK_DH] load of k (in timm's packed qkv layout the
     H*Dh elements of a token are contiguous; any strides work) against q of the group's heads,
     loaded once; the next tile's load is issued before this one is used (two tiles in flight
     per program; not for head dims over 256, which loop over Dh chunks); the logits [BLOCK_T, BLOCK_H] stay on chip with a running max and sum per
     (lane, head) element, so no reduction crosses warps inside the loop; the logits of the patch
     keys go to a scratch [B, H, N] (written once);
  2. the running maxima and sums are merged per head, then ONE barrier;
  3. per patch tile, the logits are read back once and turned into probabilities summed over the
     group's heads: with one group (G = 1) this is the output row (/H, + prior), else the group's
     partial row of a [B, G, N] buffer.
With G > 1 a second tiny kernel (``_combine_kernel``, grid (B, N tiles)) adds the G partials of
each patch in ascending group order, divides by H and adds the prior. It was chosen over "the last
arriving program of an image reduces" (an atomic counter) because that needs a zeroed counter per
image (a memset launch, or counters that reset themselves), a release/acquire fence pair and a
serial tail in one program; the second launch costs a few microseconds, only where images are too
few to fill the GPU, and its result does not depend on which program finishes last (deterministic).

Compile facts (benchmarks/results/compile_facts.md, Triton 3.8; compile_facts_triton36.md for 3.6):
no spill in any variant on sm_80, sm_90 or gfx942; ViT-B/16 bf16 G = 1 takes 93/112 registers on
sm_80/sm_90 and 62 VGPRs on gfx942 (Triton 3.6: 108/112 and 68; float64 on 3.6 takes 241
registers, the most of any variant). Besides the scratch barrier, the kernel's barriers (6 to 19 in
all) are Triton's: the cross-warp reductions after the key loop and in pass 3, and layout
conversions of the [BLOCK_T, BLOCK_H] logits tile; for bf16 ViT-B/16 on sm_90, 2 of them per key
tile (the head-dim reduction's layout converted for the scratch store).

Scratch or recompute: the scratch moves 2 * H * N * acc bytes per image (ViT-B/16 fp32 acc:
2 * 12 * 196 * 4 = 18.8 KB, L2-resident); recomputing the logits in pass 3 would read k again,
H * T * Dh * itemsize per image (ViT-B/16 bf16: 12 * 197 * 64 * 2 = 303 KB). The scratch wins 16x.

Head groups: G = ceil(SMs / B), at most H, then equal groups of ceil(H / G) heads: G = 1 at
training batches (B = 256 on an H200 with 132 SMs); B = 64: 3 groups (ViT-B: 4 heads each);
B = 8: 12 groups of one head (the interpreter counts ``INTERPRETER_SMS``; ``FORCE_GROUPS``
overrides G, for tests). The CUDA backend takes the most groups with B * G <= 2 * SMs instead (4 at
B = 64); this rule was tried here and dropped: its ViT-L/14 fp16 variant at B = 64 (4 heads per
group) spills 48 bytes on sm_80 under Triton 3.8.
Tile sizes are heuristics (no autotuning: no GPU timings to tune against, and each launched variant
is then exactly one compiled kernel for the compile facts): a k tile of at most ``TILE`` elements
(32 per thread at 8 warps; halved for float64), BLOCK_DH = next_pow2(Dh) up to 256 (longer heads
loop over Dh chunks), heads per group capped so that one token of the group fits a tile.
"""
from __future__ import annotations

import functools
from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._common import autotune, cached, next_pow2, wrap_triton

__all__ = ["launch_cls_attention", "launch_cls_scores", "accumulation_dtype", "score_plan"]

TILE = 8192          # elements of one k tile (float64: half)
NUM_WARPS = 8
MAX_BLOCK_DH = 256
INTERPRETER_SMS = 4  # the SM count the interpreter plans for: B < 4 gives G > 1
FORCE_GROUPS: Optional[int] = None  # tests: force this many head groups (clamped to [1, H])


# Tiles are heuristics, so one config each; ``autotune`` wraps the kernels only so that torch's
# triton_op analysis finds them under the interpreter too (it recognises Autotuner, not InterpretedFunction).
@autotune([triton.Config({}, num_warps=NUM_WARPS)], key=[])
@triton.jit
def _cls_scores_kernel(q, k, prior, out, logits, H, T, P, N, Dh, hpg, G,
                       sq0, sq1, sq2, sk0, sk1, sk2, sk3, sp0, sp1, scale,
                       HAS_PRIOR: tl.constexpr, FINAL: tl.constexpr, SPLIT_DH: tl.constexpr,
                       BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_H: tl.constexpr,
                       BLOCK_DH: tl.constexpr):
    """Grid (B, G): heads [g*hpg, (g+1)*hpg) of image b. FINAL (G == 1): out [B, N] = prior +
    mean_h softmax; else out [B, G, N] = the group's sum_h softmax. logits: [B, H, N] scratch."""
    acc_ty = out.dtype.element_ty
    b = tl.program_id(0).to(tl.int64)
    g = tl.program_id(1)
    offs_h = tl.arange(0, BLOCK_H)
    heads = g * hpg + offs_h
    hmask = (offs_h < hpg) & (heads < H)
    heads = heads.to(tl.int64)
    offs_d = tl.arange(0, BLOCK_DH)
    dmask = offs_d < Dh
    q_tile = q + b * sq0 + heads[:, None] * sq1 + offs_d.to(tl.int64)[None, :] * sq2  # [BLOCK_H, BLOCK_DH]
    qd_mask = hmask[:, None] & dmask[None, :]
    if not SPLIT_DH:
        qt = tl.load(q_tile, mask=qd_mask, other=0.0).to(acc_ty)
    k_ptrs = (k + b * sk0 + tl.arange(0, BLOCK_T).to(tl.int64)[:, None, None] * sk2
              + heads[None, :, None] * sk1 + offs_d.to(tl.int64)[None, None, :] * sk3)
    step = tl.full((), BLOCK_T, tl.int64) * sk2
    dstep_q = tl.full((), BLOCK_DH, tl.int64) * sq2
    dstep_k = tl.full((), BLOCK_DH, tl.int64) * sk3
    log_row = logits + (b * H + heads[None, :]) * N - P  # + t: the patch logits of token t >= P
    run_max = tl.full((BLOCK_T, BLOCK_H), float("-inf"), acc_ty)
    run_sum = tl.zeros((BLOCK_T, BLOCK_H), acc_ty)
    if not SPLIT_DH:  # the first key tile; each step then loads the next before it uses this one
        k_next = tl.load(k_ptrs, mask=(tl.arange(0, BLOCK_T) < T)[:, None, None] & qd_mask[None, :, :], other=0.0)
    for t0 in range(0, T, BLOCK_T):
        offs_t = t0 + tl.arange(0, BLOCK_T)
        tmask = offs_t < T
        if SPLIT_DH:
            logit = tl.zeros((BLOCK_T, BLOCK_H), acc_ty)
            q_part, k_part = q_tile, k_ptrs
            for d0 in range(0, Dh, BLOCK_DH):
                dm = (d0 + offs_d) < Dh
                qt = tl.load(q_part, mask=hmask[:, None] & dm[None, :], other=0.0).to(acc_ty)
                kt = tl.load(k_part, mask=tmask[:, None, None] & hmask[None, :, None] & dm[None, None, :],
                             other=0.0).to(acc_ty)
                logit += tl.sum(kt * qt[None, :, :], axis=2)
                q_part += dstep_q
                k_part += dstep_k
        else:
            kt = k_next
            k_next = tl.load(k_ptrs + step, mask=((offs_t + BLOCK_T) < T)[:, None, None] & qd_mask[None, :, :],
                             other=0.0)
            logit = tl.sum(kt.to(acc_ty) * qt[None, :, :], axis=2)
        k_ptrs += step
        valid = tmask[:, None] & hmask[None, :]
        logit = tl.where(valid, logit * scale, float("-inf"))
        tl.store(log_row + offs_t[:, None], logit, mask=valid & (offs_t >= P)[:, None])
        new_max = tl.maximum(run_max, logit)
        ref = tl.where(new_max == float("-inf"), 0.0, new_max)  # an all -inf lane stays (max -inf, sum 0)
        run_sum = run_sum * tl.exp(run_max - ref) + tl.exp(logit - ref)
        run_max = new_max
    top = tl.max(run_max, axis=0)  # [BLOCK_H]
    ref = tl.where(top == float("-inf"), 0.0, top)
    total = tl.sum(run_sum * tl.exp(run_max - ref[None, :]), axis=0)
    total = tl.where(total == 0.0, 1.0, total)  # padding heads: probabilities exp(-inf) / 1 = 0
    tl.debug_barrier()  # the scratch logits stored above are read back by other threads

    offs_hn = tl.arange(0, BLOCK_H)
    hmask_n = (offs_hn < hpg) & (g * hpg + offs_hn < H)
    log_row = logits + (b * H + (g * hpg + offs_hn).to(tl.int64)[None, :]) * N
    if FINAL:
        out_row = out + b * N
    else:
        out_row = out + (b * G + g) * N
    for n0 in range(0, N, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        nmask = offs_n < N
        logit = tl.load(log_row + offs_n[:, None], mask=nmask[:, None] & hmask_n[None, :], other=float("-inf"))
        acc = tl.sum(tl.exp(logit - ref[None, :]) / total[None, :], axis=1)
        if FINAL:
            acc = acc / H
            if HAS_PRIOR:
                acc = tl.load(prior + b * sp0 + offs_n.to(tl.int64) * sp1, mask=nmask, other=0.0).to(acc_ty) + acc
        tl.store(out_row + offs_n, acc, mask=nmask)


@autotune([triton.Config({}, num_warps=4)], key=[])
@triton.jit
def _combine_kernel(partial, prior, out, H, N, G, sp0, sp1,
                    HAS_PRIOR: tl.constexpr, BLOCK_N: tl.constexpr):
    """Grid (B, cdiv(N, BLOCK_N)): out [B, N] = prior + (sum over g = 0, 1, ... of partial [B, G, N]) / H."""
    b = tl.program_id(0).to(tl.int64)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    nmask = offs_n < N
    row = partial + b * G * N + offs_n
    acc = tl.load(row, mask=nmask, other=0.0)
    for _ in range(1, G):
        row += N
        acc += tl.load(row, mask=nmask, other=0.0)
    acc = acc / H
    if HAS_PRIOR:
        acc = tl.load(prior + b * sp0 + offs_n.to(tl.int64) * sp1, mask=nmask, other=0.0).to(acc.dtype) + acc
    tl.store(out + b * N + offs_n, acc, mask=nmask)


def accumulation_dtype(q: Tensor) -> torch.dtype:
    return torch.float64 if q.dtype == torch.float64 else torch.float32


@functools.lru_cache(maxsize=16)
def _sm_count(index: Optional[int]) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def sm_count(device: torch.device) -> int:
    """The device's SM count (``INTERPRETER_SMS`` for CPU tensors under the interpreter)."""
    return _sm_count(device.index) if device.type == "cuda" else INTERPRETER_SMS


@functools.lru_cache(maxsize=512)
def score_plan(b: int, h: int, t: int, dh: int, wide: bool, sms: int, force: Optional[int]) -> dict:
    """Groups and tile sizes of a scoring launch (``wide``: 8-byte elements)."""
    tile = TILE // 2 if wide else TILE
    block_dh = min(next_pow2(dh), MAX_BLOCK_DH)
    max_hpg = max(1, tile // block_dh)
    groups = force if force is not None else -(-sms // max(b, 1))
    groups = min(max(groups, 1), h)
    hpg = min(-(-h // groups), max_hpg)
    block_h = next_pow2(hpg)
    return dict(groups=-(-h // hpg), hpg=hpg, SPLIT_DH=dh > block_dh, BLOCK_DH=block_dh, BLOCK_H=block_h,
                BLOCK_T=max(1, min(tile // (block_h * block_dh), 64, next_pow2(t))),
                BLOCK_N=max(1, min(tile // block_h, 256, next_pow2(t))))


def launch_args(q: Tensor, k: Tensor, prior: Optional[Tensor], out: Tensor, logits: Tensor,
                num_prefix_tokens: int, scale: float, plan: dict) -> tuple:
    """The runtime arguments of ``_cls_scores_kernel`` (also used by the compile check)."""
    prior_t = out if prior is None else prior
    b, h, t, dh = k.shape
    return (q, k, prior_t, out, logits, h, t, num_prefix_tokens, t - num_prefix_tokens, dh,
            plan["hpg"], plan["groups"], *q.stride(), *k.stride(),
            prior_t.stride(0), prior_t.stride(-1), scale)


def kernel_constexprs(plan: dict, has_prior: bool) -> dict:
    return dict(HAS_PRIOR=has_prior, FINAL=plan["groups"] == 1,
                **{name: plan[name] for name in ("SPLIT_DH", "BLOCK_T", "BLOCK_N", "BLOCK_H", "BLOCK_DH")})


def launch_cls_scores(q: Tensor, k: Tensor, prior: Optional[Tensor], num_prefix_tokens: int,
                      scale: float) -> Tensor:
    """q [B, H, Dh], k [B, H, T, Dh] (+ prior [B, N]), checked -> [B, N] in the accumulation dtype:
    the scoring kernel (+ the combine kernel when G > 1)."""
    b, h, t, dh = k.shape
    n = t - num_prefix_tokens
    dtype = accumulation_dtype(q)
    key = (b, h, t, dh, dtype == torch.float64, sm_count(q.device), FORCE_GROUPS)
    plan = cached(score_plan, *key)
    groups = plan["groups"]
    out = torch.empty(b, n, dtype=dtype, device=q.device)
    logits = torch.empty(b, h, n, dtype=dtype, device=q.device)
    target = out if groups == 1 else torch.empty(b, groups, n, dtype=dtype, device=q.device)
    wrap_triton(_cls_scores_kernel)[(b, groups)](
        *launch_args(q, k, prior, target, logits, num_prefix_tokens, scale, plan),
        **kernel_constexprs(plan, prior is not None))
    if groups > 1:
        prior_t = out if prior is None else prior
        block_n = min(1024, next_pow2(n))
        wrap_triton(_combine_kernel)[(b, triton.cdiv(n, block_n))](
            target, prior_t, out, h, n, groups, prior_t.stride(0), prior_t.stride(-1),
            HAS_PRIOR=prior is not None, BLOCK_N=block_n)
    return out


def launch_cls_attention(q: Tensor, k: Tensor, num_prefix_tokens: int, scale: float,
                         prior: Optional[Tensor]) -> Tensor:
    """q [B, H, Dh], k [B, H, T, Dh] (+ prior [B, N]) -> [B, N]: the launch behind the op
    ``aclip_kernels::cls_attention_triton`` (aclip_kernels/ops/cls_attention.py), which checks the arguments."""
    return launch_cls_scores(q, k, prior, num_prefix_tokens, scale)


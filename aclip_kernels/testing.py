"""Inputs for parity tests and benchmarks: one grid of attentive_mask cases shared by every backend's
tests (CPU, Triton, CUDA), and the comparison that all of them apply."""
from __future__ import annotations

import itertools
import os
from dataclasses import dataclass, replace
from typing import Dict, List, Optional, Tuple

import torch
from torch import Tensor

from .reference import (_score_grid, attentive_mask_ref, cls_attention_ref, gather_tokens_ref, select_patches_ref,
                        unit_scores_ref)

__all__ = ["MaskCase", "mask_cases", "make_mask_inputs", "assert_mask_matches_reference", "score_tolerance",
           "CLS_ATTENTION_TOL", "random_boxes", "crop_views", "cls_attention_inputs", "assert_cls_attention_close",
           "requires_cuda", "child_environment"]

# Tolerances of cls_attention against the fp32 reference, per input dtype (the kernels accumulate
# in fp32; the inputs are what they are, so fp16/bf16 only change how q and k were rounded).
CLS_ATTENTION_TOL: Dict[torch.dtype, Tuple[float, float]] = {
    torch.float64: (1e-10, 1e-8),
    torch.float32: (1e-6, 1e-5),
    torch.float16: (1e-6, 1e-5),
    torch.bfloat16: (1e-6, 1e-5),
}


@dataclass(frozen=True)
class MaskCase:
    """One attentive_mask configuration. ``scores`` is how the scores are made:
    "random", "ties" (small integers), "nan" (random with NaN holes), "qk" (fused q/k),
    "qk_prior" (fused q/k + prior) or "coarse" (a smaller score grid than the online one)."""
    name: str
    images: int = 2                  # Bs
    views: int = 1                   # V
    prefix: int = 1                  # P
    grid: Tuple[int, int] = (14, 14)
    width: int = 64                  # D
    block: int = 1
    keep: object = 0.5
    boxes: bool = False
    dtype: torch.dtype = torch.float32
    strided: bool = False            # x is a strided slice of a larger tensor
    scores: str = "random"
    heads: int = 4

    @property
    def id(self) -> str:
        return self.name


def random_boxes(rows: int, generator: torch.Generator, min_size: float = 0.5) -> Tensor:
    """[rows, 4] (y0, x0, h, w) crops inside the unit square with sides in [min_size, 1]."""
    size = min_size + (1 - min_size) * torch.rand(rows, 2, generator=generator)
    origin = (1 - size) * torch.rand(rows, 2, generator=generator)
    return torch.cat([origin, size], dim=1)


def crop_views(images: Tensor, boxes: Tensor, size: int) -> Tensor:
    """images [B, C, H, W], boxes [V*B, 4] (y0, x0, h, w) as fractions of the image, rows view-major
    (row v*B + i crops image i) -> the online views [V*B, C, size, size], bilinearly resampled."""
    b, _, height, width = images.shape
    rows = boxes.shape[0]
    y0, x0, h, w = (boxes.to(images.dtype) * torch.tensor([height, width, height, width], dtype=images.dtype)).unbind(1)
    theta = torch.zeros(rows, 2, 3, dtype=images.dtype)           # the affine map of each box, in [-1, 1] coordinates
    theta[:, 0, 0], theta[:, 0, 2] = w / width, (2 * x0 + w) / width - 1
    theta[:, 1, 1], theta[:, 1, 2] = h / height, (2 * y0 + h) / height - 1
    source = images[torch.arange(rows) % b]
    grid = torch.nn.functional.affine_grid(theta.to(images.device), [rows, images.shape[1], size, size],
                                           align_corners=False)
    return torch.nn.functional.grid_sample(source, grid, mode="bilinear", align_corners=False)


def make_mask_inputs(case: MaskCase, device="cpu", seed: int = 0) -> dict:
    """The keyword arguments of ``attentive_mask`` for ``case`` (x first), on ``device``."""
    g = torch.Generator().manual_seed(seed)
    bs, bx = case.images, case.images * case.views
    n = case.grid[0] * case.grid[1]
    t = case.prefix + n
    if case.strided:   # every other row of a wider tensor (made on the device), and a slice of its width
        wide = torch.randn(2 * bx, t, case.width + 8, generator=g).to(device=device, dtype=case.dtype)
        x = wide[::2, :, 4:4 + case.width]
    else:
        x = torch.randn(bx, t, case.width, generator=g).to(device=device, dtype=case.dtype)
    kwargs = dict(x=x, keep=case.keep, num_prefix_tokens=case.prefix,
                  grid=case.grid, block=case.block)
    if case.scores in ("qk", "qk_prior"):
        dh = 16
        kwargs["q"] = torch.randn(bs, case.heads, dh, generator=g).to(case.dtype)
        kwargs["k"] = torch.randn(bs, case.heads, t, dh, generator=g).to(case.dtype)
        if case.scores == "qk_prior":
            kwargs["prior"] = torch.rand(bs, n, generator=g) / n
        if case.grid[0] != case.grid[1]:
            raise ValueError("fused q/k cases need a square grid (the score grid of k is square)")
    elif case.scores == "coarse":
        hs, ws = max(1, case.grid[0] // 2 + 1), max(1, case.grid[1] // 2 + 1)
        kwargs["scores"] = torch.randn(bs, hs, ws, generator=g)
    else:
        scores = torch.randn(bs, *case.grid, generator=g)
        if case.scores == "ties":
            scores = torch.randint(0, 3, (bs, *case.grid), generator=g).float()
        elif case.scores == "nan":
            scores[torch.rand(scores.shape, generator=g) < 0.3] = float("nan")
        kwargs["scores"] = scores
    if case.boxes:
        kwargs["boxes"] = random_boxes(bx, g)
    return {k: (v.to(device) if isinstance(v, Tensor) and k != "x" else v) for k, v in kwargs.items()}


def mask_cases(quick: bool = False) -> List[MaskCase]:
    """The parity grid of the foundation issue: ViT-B/16, ViT-L/14@336 and an odd grid; P 0/1/5;
    block 1/2 with and without boxes; 2 views; k=1 and k=all; ties, NaN; fp32/bf16; strided x;
    fused q/k (+prior) and a coarse score grid. ``quick`` keeps small widths for slow backends."""
    cases: List[MaskCase] = [
        MaskCase("vitb16", images=4, width=768),
        MaskCase("vitb16-aclip", images=4, views=2, width=768, block=2, boxes=True),
        MaskCase("vitl14-336", images=2, grid=(24, 24), width=1024, block=2, boxes=True, views=2),
        MaskCase("odd-7x9", grid=(7, 9), width=40),
        MaskCase("odd-7x9-boxes", grid=(7, 9), width=40, boxes=True, views=2),
        MaskCase("coarse-scores", grid=(8, 8), block=2, scores="coarse"),
        MaskCase("coarse-scores-boxes", grid=(8, 8), scores="coarse", boxes=True, views=2),
        MaskCase("fused-qk", grid=(8, 8), scores="qk", views=2, boxes=True, block=2),
        MaskCase("fused-qk-prior", grid=(8, 8), scores="qk_prior", prefix=5),
        MaskCase("fused-qk-bf16", grid=(8, 8), scores="qk", dtype=torch.bfloat16),
    ]
    for prefix, block, boxes in itertools.product((0, 1, 5), (1, 2), (False, True)):
        cases.append(MaskCase(f"p{prefix}-b{block}-{'boxes' if boxes else 'noboxes'}", prefix=prefix,
                              grid=(8, 8), block=block, boxes=boxes, views=2 if boxes else 1))
    for keep in (1, 1.0):
        for block in (1, 2):
            cases.append(MaskCase(f"keep{keep!r}-b{block}", grid=(8, 8), block=block, keep=keep))
    for kind, block in itertools.product(("ties", "nan"), (1, 2)):
        cases.append(MaskCase(f"{kind}-b{block}", grid=(8, 8), block=block, scores=kind))
    cases.append(MaskCase("nan-boxes", grid=(8, 8), scores="nan", boxes=True))
    for dtype in (torch.bfloat16, torch.float16):
        cases.append(MaskCase(f"{str(dtype)[6:]}-b2-boxes", grid=(8, 8), block=2, boxes=True, dtype=dtype, views=2))
    cases.append(MaskCase("strided", grid=(8, 8), block=2, strided=True, views=2, boxes=True))
    cases.append(MaskCase("strided-bf16", grid=(8, 8), strided=True, dtype=torch.bfloat16))
    if quick:
        cases = [replace(c, width=min(c.width, 64)) for c in cases]
    return cases


def score_tolerance(inputs: dict) -> Optional[Tuple[float, float]]:
    """(rtol, atol) of the unit scores a kernel computes on hardware for ``inputs``: those of
    ``CLS_ATTENTION_TOL`` for fused q/k scores (hardware FMA, ``ex2.approx``, ``expf`` change the last
    bits; the alignment and pooling after it are convex combinations, so they keep the bound), None
    (exact) for given scores."""
    return CLS_ATTENTION_TOL[inputs["q"].dtype] if inputs.get("q") is not None else None


def assert_mask_matches_reference(kept: Tensor, idx: Tensor, inputs: dict,
                                  score_tol: Optional[Tuple[float, float]] = None) -> None:
    """idx and every gathered row against the reference, evaluated on the CPU.

    ``score_tol=None``: idx exactly equal. ``score_tol=(rtol, atol)``, for scores that are only
    within that tolerance of the reference's: a row's idx is compared exactly where the reference's
    n-th and (n+1)-th best unit scores are more than the tolerance apart; elsewhere the row must be
    a valid top-n within it (n whole units, ascending, no kept unit scored more than the tolerance
    below a dropped one; NaN lowest). The gathered rows are always exact for the idx returned.
    """
    cpu = {k: (v.cpu() if isinstance(v, Tensor) else v) for k, v in inputs.items()}
    ref_kept, ref_idx = attentive_mask_ref(**cpu)
    assert idx.dtype == torch.int64 and kept.dtype == inputs["x"].dtype
    idx, kept = idx.cpu(), kept.cpu()
    if score_tol is None:
        torch.testing.assert_close(idx, ref_idx, rtol=0, atol=0)
    else:
        _assert_top_n_within(idx, ref_idx, cpu, score_tol)
    expected = gather_tokens_ref(cpu["x"], idx, cpu.get("num_prefix_tokens", 1))
    torch.testing.assert_close(kept, expected, rtol=0, atol=0, equal_nan=True)
    if score_tol is None:
        torch.testing.assert_close(kept, ref_kept, rtol=0, atol=0, equal_nan=True)


def _assert_top_n_within(idx: Tensor, ref_idx: Tensor, inputs: dict, score_tol: Tuple[float, float]) -> None:
    rtol, atol = score_tol
    args = {k: v for k, v in inputs.items() if k not in ("keep", "x")}
    units = unit_scores_ref(inputs["x"], **args)
    units = units.masked_fill(units.isnan(), float("-inf"))
    x = inputs["x"]
    p, block = inputs.get("num_prefix_tokens", 1), inputs.get("block", 1)
    grid = _score_grid(x.shape[1] - p, None if inputs.get("grid") is None else tuple(inputs["grid"]))
    n = ref_idx.shape[1] // (block * block)
    assert idx.shape == ref_idx.shape, (idx.shape, ref_idx.shape)
    ranked = units.sort(dim=1, descending=True).values
    for row in range(idx.shape[0]):
        scores = units[row]
        finite = scores[scores.isfinite()]
        tol = atol + rtol * (float(finite.abs().max()) if finite.numel() else 0.0)
        if n == scores.numel() or float(ranked[row, n - 1] - ranked[row, n]) > tol:
            assert torch.equal(idx[row], ref_idx[row]), (
                f"row {row}: idx differs from the reference where the scores are separated by more than "
                f"{tol:.3g}: {idx[row].tolist()} vs {ref_idx[row].tolist()}")
            continue
        unit_of = (idx[row] // grid[1] // block) * (grid[1] // block) + (idx[row] % grid[1]) // block
        chosen = torch.zeros(scores.numel(), dtype=torch.bool)
        chosen[unit_of] = True
        assert int(chosen.sum()) == n, f"row {row}: idx {idx[row].tolist()} does not cover {n} whole units"
        whole = select_patches_ref(chosen.float()[None], n, grid, block)[0]
        assert torch.equal(idx[row], whole), f"row {row}: idx {idx[row].tolist()} is not {n} whole ascending units"
        worst_kept, best_dropped = float(scores[chosen].min()), float(scores[~chosen].max())
        assert worst_kept >= best_dropped - tol, (
            f"row {row}: a kept unit scores {worst_kept!r}, more than {tol:.3g} below a dropped one ({best_dropped!r})")


def cls_attention_inputs(batch: int, heads: int, tokens: int, head_dim: int, dtype: torch.dtype,
                         device="cpu", strided: bool = False, seed: int = 0) -> Tuple[Tensor, Tensor]:
    """q [B, H, Dh], k [B, H, T, Dh]; ``strided`` gives k the layout of a fused qkv projection
    ([B, T, 3, H, Dh] permuted), as timm and open_clip produce it."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, heads, head_dim, generator=g)
    if strided:
        qkv = torch.randn(batch, tokens, 3, heads, head_dim, generator=g)
        k = qkv.to(dtype).to(device).permute(2, 0, 3, 1, 4)[1]
    else:
        k = torch.randn(batch, heads, tokens, head_dim, generator=g).to(dtype).to(device)
    return q.to(dtype).to(device), k


def assert_cls_attention_close(result: Tensor, q: Tensor, k: Tensor, num_prefix_tokens: int,
                               scale: Optional[float] = None) -> None:
    """Within the per-dtype tolerance of the fp32 (fp64) reference computed on the CPU."""
    ref = cls_attention_ref(q.cpu(), k.cpu(), num_prefix_tokens, scale)
    rtol, atol = CLS_ATTENTION_TOL[q.dtype]
    torch.testing.assert_close(result.cpu(), ref, rtol=rtol, atol=atol)


def requires_cuda(test):
    """Skip ``test`` (with the reason "no CUDA device") where no GPU is visible."""
    import pytest
    return pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")(test)


def child_environment(drop=()) -> Dict[str, str]:
    """The environment for a pytest run in a child process: this one's without the names in ``drop``
    and without pytest-xdist's worker variables (with them, the child would take itself for a worker,
    and pytest-benchmark would disable its benchmarks)."""
    return {k: v for k, v in os.environ.items() if k not in drop and not k.startswith("PYTEST_XDIST")}

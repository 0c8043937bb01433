"""Hostile-input probes of the ops, run by tests/ops/test_bad_input.py in child processes.

Each probe is a call with bad (or unusual but valid) arguments. ``public`` probes call the public
API (``ak.attentive_mask`` ...) with ``backend=``; ``direct`` probes call an op of the schema of
aclip_kernels/ops/<op>.py directly, as anyone can through torch.ops, bypassing the Python checks. A probe
``expects`` an exception type whose message names every word of ``names``, or ``None``: the call is
valid and must return what the reference returns.

Run as a worker: ``python bad_input_probes.py KIND BACKEND START [LIBRARY]`` runs the probes of
KIND (public|direct|selftest) from index START on BACKEND and prints one ``RESULT {json}`` line per probe;
the parent notices a crash or hang as the probe that never reported.
"""
from __future__ import annotations

import json
import math
import os
import sys
import traceback
from dataclasses import dataclass
from typing import Callable, List, Optional, Tuple

import numpy as np
import torch


@dataclass(frozen=True)
class Probe:
    name: str
    call: Callable  # (target) -> result; target is ak (public) or an op namespace adapter (direct)
    expects: Optional[type]
    names: Tuple[str, ...] = ()


def _x(bx=4, p=1, n=16, d=8, dtype=torch.float32):
    return torch.arange(bx * (p + n) * d, dtype=torch.float32).reshape(bx, p + n, d).to(dtype)


def _s(bs=2, n=16):
    return torch.linspace(-1, 1, bs * n).reshape(bs, n).flip(-1)


def _qk(bs=2, h=2, t=17, dh=4, dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    return (torch.randn(bs, h, dh, generator=g).to(dtype), torch.randn(bs, h, t, dh, generator=g).to(dtype))


def _boxes(bx=4, value=None, dtype=torch.float32, strided=False):
    """[bx, 4] boxes, ``value`` at [1, 2]; ``strided``: every other column of a [4, bx * 2] tensor, transposed."""
    b = torch.tensor([[0.1, 0.2, 0.5, 0.6]]).repeat(bx, 1)
    if value is not None:
        b[1, 2] = value
    if strided:
        b = torch.zeros(4, bx * 2).index_copy_(1, torch.arange(0, bx * 2, 2), b.t()).t()[::2]
    return b.to(dtype)


def _mask(**kw):
    """A public attentive_mask call: target is the aclip_kernels module, backend bound by the worker."""
    return lambda ak, backend: ak.attentive_mask(**kw, backend=backend)


def _accepted(**kw):
    """A valid call with numpy scalars: must equal the same call with Python numbers."""
    def call(ak, backend):
        plain = {k: (v.item() if isinstance(v, np.generic) else
                     tuple(int(s) for s in v) if k == "grid" else v) for k, v in kw.items()}
        got = ak.attentive_mask(**kw, backend=backend)
        want = ak.attentive_mask(**plain, backend="torch")
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
    return call


def _empty(**kw):
    def call(ak, backend):
        kept, idx = ak.attentive_mask(**kw, backend=backend)
        ref_kept, ref_idx = ak.attentive_mask(**kw, backend="torch")
        assert kept.shape == ref_kept.shape and idx.shape == ref_idx.shape, (kept.shape, ref_kept.shape)
        if kept.numel():
            torch.testing.assert_close(kept, ref_kept, rtol=0, atol=0)
            torch.testing.assert_close(idx, ref_idx, rtol=0, atol=0)
    return call


X, S = _x(), _s()
Q, K = _qk()
Q16, K32 = _qk(dtype=torch.float16)[0], _qk()[1]

PUBLIC: List[Probe] = [
    Probe("nan-boxes", _mask(x=X, scores=S, boxes=_boxes(value=math.nan)), ValueError, ("boxes", "finite")),
    Probe("inf-boxes", _mask(x=X, scores=S, boxes=_boxes(value=math.inf)), ValueError, ("boxes", "finite")),
    Probe("negative-grid-block2", _mask(x=X, scores=S, grid=(-4, -4), block=2), ValueError, ("grid", "-4")),
    Probe("negative-grid-block1", _mask(x=X, scores=S, grid=(-4, -4)), ValueError, ("grid", "-4")),
    Probe("fractional-grid", _mask(x=_x(n=16), scores=S, grid=(2.7, 8)), TypeError, ("grid", "2.7")),
    Probe("grid-of-three", _mask(x=X, scores=S, grid=(4, 4, 1)), TypeError, ("grid",)),
    Probe("grid-string", _mask(x=X, scores=S, grid="44"), TypeError, ("grid",)),
    Probe("zero-grid", _mask(x=_x(n=0, p=1), scores=S, grid=(0, 4)), ValueError, ("num_prefix_tokens",)),
    Probe("keep-nan", _mask(x=X, scores=S, keep=math.nan), ValueError, ("keep",)),
    Probe("keep-inf", _mask(x=X, scores=S, keep=math.inf), ValueError, ("keep",)),
    Probe("keep-string", _mask(x=X, scores=S, keep="0.5"), TypeError, ("keep",)),
    Probe("keep-negative-int", _mask(x=X, scores=S, keep=np.int64(-3)), ValueError, ("keep=-3",)),
    Probe("keep-numpy-bool", _mask(x=X, scores=S, keep=np.bool_(True)), TypeError, ("keep",)),
    Probe("block-zero", _mask(x=X, scores=S, block=0), ValueError, ("block",)),
    Probe("block-negative", _mask(x=X, scores=S, block=-2), ValueError, ("block",)),
    Probe("block-float", _mask(x=X, scores=S, block=2.0), TypeError, ("block",)),
    Probe("prefix-negative", _mask(x=X, scores=S, num_prefix_tokens=-1), ValueError, ("num_prefix_tokens",)),
    Probe("prefix-float", _mask(x=X, scores=S, num_prefix_tokens=1.0), TypeError, ("num_prefix_tokens",)),
    Probe("qk-dtypes-differ", _mask(x=X, q=Q16, k=K32), TypeError, ("q", "k", "float16", "float32")),
    Probe("qk-no-heads", _mask(x=X, q=Q[:, :0], k=K[:, :0]), ValueError, ("heads",)),
    Probe("qk-no-head-dim", _mask(x=X, q=Q[..., :0], k=K[..., :0]), ValueError, ("head dim",)),
    Probe("scale-nan", _mask(x=X, q=Q, k=K, scale=math.nan), ValueError, ("scale",)),
    Probe("scale-string", _mask(x=X, q=Q, k=K, scale="1"), TypeError, ("scale",)),
    Probe("boxes-int", _mask(x=X, scores=S, boxes=_boxes().long()), TypeError, ("boxes", "int64")),
    Probe("boxes-meta", _mask(x=X, scores=S, boxes=_boxes().to("meta")), ValueError, ("boxes", "meta")),
    Probe("scores-empty-batch", _mask(x=X, scores=S[:0]), ValueError, ("rows",)),
    Probe("prior-int", _mask(x=X, q=Q, k=K, prior=torch.zeros(2, 16, dtype=torch.long)), TypeError, ("prior",)),
    Probe("cls-dtypes-differ", lambda ak, b: ak.cls_attention(Q16, K32, backend=b), TypeError, ("q", "k")),
    Probe("cls-no-head-dim", lambda ak, b: ak.cls_attention(Q[..., :0], K[..., :0], backend=b), ValueError,
          ("head dim",)),
    Probe("cls-scale-inf", lambda ak, b: ak.cls_attention(Q, K, scale=math.inf, backend=b), ValueError, ("scale",)),
    Probe("random-negative-grid", lambda ak, b: ak.random_mask(X, grid=(-4, -4), backend=b), ValueError, ("grid",)),
    Probe("random-fractional-grid", lambda ak, b: ak.random_mask(X, grid=(4.0, 4)), TypeError, ("grid",)),
    Probe("numpy-keep-float32", _accepted(x=X, scores=S, keep=np.float32(0.5)), None),
    Probe("numpy-keep-int64", _accepted(x=X, scores=S, keep=np.int64(4)), None),
    Probe("numpy-grid-block-prefix", _accepted(x=X, scores=S, grid=(np.int64(4), np.int32(4)), block=np.int64(2),
                                               num_prefix_tokens=np.int64(1), keep=np.float64(0.5)), None),
    Probe("numpy-boxes-qk-scale", _accepted(x=X, q=Q, k=K, boxes=_boxes(), scale=np.float32(0.25)), None),
    Probe("boxes-strided-float64", _accepted(x=X, scores=S, boxes=_boxes(dtype=torch.float64, strided=True)), None),
    Probe("empty-batch", _empty(x=X[:0], scores=S, keep=3), None),
    Probe("zero-width", _empty(x=X[..., :0], scores=S, keep=3, boxes=_boxes()), None),
    Probe("all-nan-scores-keep-all", _empty(x=X, scores=torch.full((2, 16), math.nan), keep=16, block=1), None),
]


class Direct:
    """The schema ops of one backend: ``mask``, ``backward`` and ``cls`` take the schema's arguments."""

    def __init__(self, backend: str):
        suffix = "_triton" if backend == "triton" else ""
        ns = {"cpu": "aclip_kernels", "triton": "aclip_kernels", "cuda-emulated": "aclip_kernels_emu",
              "native": "aclip_kernels_native"}[backend]
        ops = getattr(torch.ops, ns)
        self.mask = getattr(ops, "attentive_mask" + suffix)
        self.backward = getattr(ops, "attentive_mask_backward" + suffix)
        self.cls = getattr(ops, "cls_attention" + suffix)


def _op(x=X, scores=S, q=None, k=None, prior=None, boxes=None, p=1, score_grid=(4, 4), grid=(4, 4), block=1,
        units=8, scale=0.5):
    return lambda d: d.mask(x, scores, q, k, prior, boxes, p, list(score_grid), list(grid), block, units, scale)


def _bwd(idx, p=1, n=16, m=None, d=8, dtype=torch.float32):
    idx = torch.as_tensor(idx)
    m = idx.shape[1] if m is None else m
    return lambda ops: ops.backward(torch.ones(idx.shape[0], p + m, d, dtype=dtype), idx, p, n)


def _cls(q=Q, k=K, p=1, prior=None):
    return lambda d: d.cls(q, k, p, 0.5, prior)


def _valid_backward(d):
    idx = torch.tensor([[0, 5, 15], [1, 2, 3]])
    grad = torch.randn(2, 4, 8)
    from aclip_kernels.reference import scatter_tokens_ref
    torch.testing.assert_close(d.backward(grad, idx, 1, 16), scatter_tokens_ref(grad, idx, 1, 16), rtol=0, atol=0)


def _valid_rectangular(d):
    """Fused scores on a 2 x 8 grid of k's patches (the schema's score_grid; the public API infers square)."""
    from aclip_kernels.reference import attentive_mask_ref, cls_attention_ref
    kept, idx = d.mask(X, None, Q, K, None, None, 1, [2, 8], [4, 4], 1, 8, 0.5)
    scores = cls_attention_ref(Q, K, 1, 0.5).view(2, 2, 8)
    ref_kept, ref_idx = attentive_mask_ref(X, scores, 8, grid=(4, 4))
    torch.testing.assert_close(idx, ref_idx, rtol=0, atol=0)
    torch.testing.assert_close(kept, ref_kept, rtol=0, atol=0)


_V, _E = ValueError, TypeError
DIRECT: List[Probe] = [
    Probe("negative-grid-block2", _op(grid=(-4, -4), block=2, units=4), _V, ("grid",)),
    Probe("negative-grid-block1", _op(grid=(-4, -4)), _V, ("grid",)),
    Probe("negative-score-grid", _op(score_grid=(-4, -4)), _V, ("grid",)),
    Probe("score-grid-too-small", _op(score_grid=(3, 3)), _V, ("score",)),
    Probe("score-grid-too-large", _op(score_grid=(5, 5)), _V, ("score",)),
    Probe("overflowing-grid", _op(x=_x(n=0, p=1), grid=(2 ** 32, 2 ** 32), score_grid=(2 ** 32, 2 ** 32)), _V,
          ("grid",)),
    Probe("units-zero", _op(units=0), _V, ("num_units",)),
    Probe("units-too-many", _op(units=17), _V, ("num_units",)),
    Probe("units-too-many-block2", _op(block=2, units=5), _V, ("num_units",)),
    Probe("block-zero", _op(block=0), _V, ("block",)),
    Probe("block-not-dividing", _op(block=3), _V, ("block",)),
    Probe("tokens-mismatch", _op(x=_x(n=15)), _V, ("x",)),
    Probe("prefix-negative", _op(p=-1, x=_x(p=0, n=15)), _V, ("-1",)),
    Probe("nan-boxes", _op(boxes=_boxes(value=math.nan)), _V, ("boxes", "finite")),
    Probe("inf-boxes", _op(boxes=_boxes(value=-math.inf)), _V, ("boxes", "finite")),
    Probe("inf-boxes-strided", _op(boxes=_boxes(value=math.inf, strided=True)), _V, ("boxes", "finite")),
    Probe("nan-boxes-half", _op(boxes=_boxes(value=math.nan, dtype=torch.half)), _V, ("boxes", "finite")),
    Probe("inf-boxes-bfloat16", _op(boxes=_boxes(value=math.inf, dtype=torch.bfloat16)), _V, ("boxes", "finite")),
    Probe("boxes-shape", _op(boxes=_boxes()[:, :3]), _V, ("boxes",)),
    Probe("boxes-rows", _op(boxes=_boxes(bx=2)), _V, ("boxes",)),
    Probe("batch-not-multiple", _op(scores=_s(bs=3)), _V, ("rows",)),
    Probe("scores-empty", _op(scores=_s(bs=0)), _V, ("rows",)),
    Probe("scores-and-qk", _op(q=Q, k=K), _V, ("scores", "q")),
    Probe("neither", _op(scores=None), _V, ("scores", "q")),
    Probe("prior-with-scores", _op(prior=torch.zeros(2, 16)), _V, ("prior",)),
    Probe("qk-score-grid-mismatch", _op(scores=None, q=Q, k=K, score_grid=(3, 5)), _V, ("score_grid",)),
    Probe("qk-dtypes-differ", _op(scores=None, q=Q16, k=K32), _E, ("q", "k")),
    Probe("qk-prior-shape", _op(scores=None, q=Q, k=K, prior=torch.zeros(2, 15)), _V, ("prior",)),
    Probe("scores-int", _op(scores=_s().long()), _E, ("scores",)),
    Probe("backward-index-too-large", _bwd([[0, 70], [3, 15]]), _V, ("idx",)),
    Probe("backward-index-negative", _bwd([[-1, 2], [3, 15]]), _V, ("idx",)),
    Probe("backward-index-equal-n", _bwd([[0, 16], [3, 15]]), _V, ("idx",)),
    Probe("backward-index-descending", _bwd([[5, 2], [3, 15]]), _V, ("idx",)),
    Probe("backward-index-repeated", _bwd([[2, 2], [3, 15]]), _V, ("idx",)),
    Probe("backward-index-descending-strided", _bwd(torch.tensor([[5, 3], [2, 15]]).t()), _V, ("idx",)),
    Probe("backward-index-int32", _bwd(torch.tensor([[0, 2], [3, 15]], dtype=torch.int32)), _E, ("idx",)),
    Probe("backward-grad-rows", _bwd([[0, 2], [3, 15]], m=3), _V, ("grad_kept",)),
    Probe("backward-fewer-patches", _bwd([[0, 1], [0, 1]], n=1), _V, ("num_patches",)),
    Probe("backward-prefix-negative", _bwd([[0, 1], [0, 1]], p=-1, m=3), _V, ("grad_kept",)),
    Probe("cls-no-heads", _cls(Q[:, :0], K[:, :0]), _V, ("heads",)),
    Probe("cls-no-head-dim", _cls(Q[..., :0], K[..., :0]), _V, ("head dim",)),
    Probe("cls-prefix-all", _cls(p=17), _V, ("num_prefix_tokens",)),
    Probe("cls-prior-shape", _cls(prior=torch.zeros(2, 15)), _V, ("prior",)),
    Probe("cls-dtypes-differ", _cls(Q16, K32), _E, ("q", "k")),
    Probe("cls-int", _cls(Q.long(), K.long()), _E, ("q",)),
    Probe("valid-backward", _valid_backward, None),
    Probe("valid-rectangular-k-grid", lambda d: _valid_rectangular(d), None),
]


# The harness's own test: a probe that kills the process, between two that pass.
SELFTEST: List[Probe] = [Probe("fine", lambda ak, b: None, None), Probe("abort", lambda ak, b: os.abort(), None),
                         Probe("after", lambda ak, b: None, None)]
PROBES = {"public": PUBLIC, "direct": DIRECT, "selftest": SELFTEST}


def run(kind: str, backend: str, start: int) -> None:
    probes = PROBES[kind]
    if kind != "direct":
        import aclip_kernels as target
        call = lambda probe: probe.call(target, backend)  # noqa: E731
    else:
        import aclip_kernels  # noqa: F401  (registers the installed ops and the Triton ones)
        target = Direct(backend)
        call = lambda probe: probe.call(target)  # noqa: E731
    for i in range(start, len(probes)):
        probe = probes[i]
        print(f"START {probe.name}", flush=True)
        try:
            call(probe)
            result = dict(outcome="returned")
        except Exception as error:  # noqa: BLE001  (the outcome is what is reported)
            result = dict(outcome="raised", type=type(error).__name__, message=str(error).split("\n")[0][:500],
                          trace=traceback.format_exc()[-1500:])
        print("RESULT " + json.dumps(dict(index=i, name=probe.name, **result)), flush=True)


if __name__ == "__main__":
    kind, backend, start = sys.argv[1], sys.argv[2], int(sys.argv[3])
    if backend == "triton" and not torch.cuda.is_available():
        os.environ["TRITON_INTERPRET"] = "1"
    if len(sys.argv) > 4:  # a native test build (tests/conftest.py): its kernels, under the package's schemas
        from pathlib import Path

        from aclip_kernels.ops._define import define_schemas
        torch.ops.load_library(sys.argv[4])
        define_schemas(Path(sys.argv[4]).stem)
    run(kind, backend, start)

"""The cached metadata checks of the public ops (aclip_kernels/ops/_check_cache.py) agree with the
full checks: the same MaskCall (or result), or the same exception type and message, over random
valid and invalid arguments, and over a second call that differs from a cached one in one field."""
import math

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import aclip_kernels as ak
from aclip_kernels.ops import _check_cache as cache
from aclip_kernels.ops._checks import check_cls_attention_args, check_mask_args, check_tokens, mask_call

SETTINGS = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow])
MASK_FIELDS = ("x", "scores", "keep", "q", "k", "prior", "num_prefix_tokens", "grid", "block", "boxes", "scale")


def outcome(fn, *args):
    """("ok", result) or ("error", exception type, message)."""
    try:
        return ("ok", fn(*args))
    except (TypeError, ValueError, RuntimeError) as error:
        return ("error", type(error), str(error))


def same_value(a, b) -> bool:
    """Tensors alike in metadata and contents (the same storage for views), or equal values of one
    type (a float's sign included), recursively through tuples."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)):
            return False
        if (a.shape, a.dtype, a.device, a.stride()) != (b.shape, b.dtype, b.device, b.stride()):
            return False
        return a.device.type == "meta" or a.data_ptr() == b.data_ptr() or torch.equal(a, b)
    if isinstance(a, tuple) and isinstance(b, tuple):
        return len(a) == len(b) and all(same_value(u, v) for u, v in zip(a, b))
    if type(a) is not type(b):
        return False
    if isinstance(a, float):
        return a == b and math.copysign(1.0, a) == math.copysign(1.0, b)
    return a == b


def assert_agree(fast, full):
    assert fast[0] == full[0], (fast, full)
    if full[0] == "error":
        assert fast[1:] == full[1:]
    else:
        assert same_value(tuple(fast[1]), tuple(full[1])), (fast[1], full[1])


@st.composite
def mask_calls(draw):
    """A valid attentive_mask call (its arguments by name) and the alternatives of each field: other
    valid values, and invalid ones of every kind the checks reject."""
    bs, views = draw(st.integers(1, 2)), draw(st.integers(1, 2))
    hg, wg = draw(st.sampled_from([(2, 2), (4, 4), (2, 4)]))
    p, d = draw(st.integers(0, 2)), draw(st.sampled_from([1, 3]))
    dtype = draw(st.sampled_from([torch.float32, torch.float16]))
    block = draw(st.sampled_from([b for b in (1, 2) if hg % b == 0 and wg % b == 0]))
    units = (hg // block) * (wg // block)
    bx, n = bs * views, hg * wg
    x = torch.randn(bx, p + n, d, dtype=dtype)
    fused = draw(st.booleans())
    call = dict(x=x, scores=None, q=None, k=None, prior=None, num_prefix_tokens=p, block=block,
                grid=None if hg == wg and draw(st.booleans()) else draw(st.sampled_from([(hg, wg), [hg, wg]])),
                keep=draw(st.one_of(st.integers(1, units), st.sampled_from([0.25, 0.5, 1.0]))),
                boxes=draw(st.sampled_from([None, torch.rand(bx, 4), torch.rand(4, bx).t(), torch.rand(bx, 4).double()])),
                scale=draw(st.sampled_from([None, 0.5, 2, -0.0, 0.0])))
    hs, ws = draw(st.sampled_from([(hg, wg), (2, 2), (2, 3)]))
    if fused:
        heads, dh = draw(st.integers(1, 2)), draw(st.sampled_from([1, 4]))
        call.update(q=torch.randn(bs, heads, dh, dtype=dtype), k=torch.randn(bs, heads, p + hs * ws, dh, dtype=dtype),
                    prior=draw(st.sampled_from([None, torch.randn(bs, hs * ws)])))
    elif hs == ws and draw(st.booleans()):
        call["scores"] = torch.randn(bs, hs * ws)
    else:
        call["scores"] = torch.randn(bs, hs, ws)
    meta = torch.device("meta")
    alternatives = dict(
        x=[x.double(), x.long(), x[0], x[:, :-1], torch.randn(bx + 1, p + n, d), x.to(meta), x.numpy(), None],
        scores=[None, torch.randn(bs, n).int(), torch.randn(bs, 1, hg, wg), torch.randn(bs + 1, n), torch.randn(bs, n + 1),
                torch.randn(bs, hg, wg, device=meta), torch.randn(bs, n).numpy(), torch.randn(bs, wg, hg)],
        q=[None, torch.randn(bs, 3, 4), torch.randn(bs, 1, 4, dtype=torch.float64), torch.randn(1, 4)],
        k=[None, torch.randn(bs, 1, p + n, 4), torch.randn(bs, 1, p + n + 1, 4), torch.randn(bs, 1, p + n, 4, device=meta)],
        prior=[None, torch.randn(bs, n), torch.randn(bs, n + 1), torch.randn(bs, n).int()],
        keep=[0, -1, units, units + 1, 1, 1.0, 1.5, 0.0, -0.0, 0.3, True, np.int64(1), float("nan"), "half", None],
        num_prefix_tokens=[-1, p + n, p + 1, max(p - 1, 0), True, np.int64(p), float(p), None],
        grid=[None, (hg, wg + 1), (wg, hg), [hg, wg], (float(hg), wg), (hg, wg, 1), torch.Size([hg, wg]), "ab",
              (np.int64(hg), wg), (0, 0)],
        block=[0, -1, 1, 2, 3, 2.0, True, np.int64(block), None],
        boxes=[None, torch.rand(bx, 3), torch.rand(bx + 1, 4), torch.rand(bx, 4).long(), torch.rand(bx, 4, device=meta),
               torch.full((bx, 4), float("nan")), torch.rand(bx, 4).half(), [[0.0] * 4] * bx],
        scale=[None, 1, 1.0, float("inf"), float("nan"), "x", True, np.float32(0.5), -0.0, 0.0],
    )
    return call, alternatives


def mask_full(call, check_values):
    return outcome(lambda: check_mask_args(*(call[f] for f in MASK_FIELDS), check_values=check_values))


def mask_fast(call, check_values):
    def run():
        c = call
        plan = cache.cached_mask_meta(*(c[f] for f in MASK_FIELDS))
        return mask_call(plan, c["x"], c["scores"], c["q"], c["k"], c["prior"], c["boxes"], check_values)
    return outcome(run)


@settings(max_examples=400, **SETTINGS)
@given(problem=mask_calls(), data=st.data())
def test_mask_fast_path_agrees_with_the_full_check(problem, data):
    call, alternatives = problem
    check_values = data.draw(st.booleans())
    assert_agree(mask_fast(call, check_values), mask_full(call, check_values))
    assert_agree(mask_fast(call, check_values), mask_full(call, check_values))  # from the cache now
    # The same call with one field changed, after the original was cached.
    field = data.draw(st.sampled_from(sorted(alternatives)))
    changed = dict(call, **{field: data.draw(st.sampled_from(alternatives[field]))})
    assert_agree(mask_fast(changed, check_values), mask_full(changed, check_values))


@settings(max_examples=150, **SETTINGS)
@given(data=st.data())
def test_cls_attention_fast_path_agrees_with_the_full_check(data):
    b, h, dh, p, n = (data.draw(st.integers(1, 2)), data.draw(st.integers(1, 2)), data.draw(st.sampled_from([1, 4])),
                      data.draw(st.integers(0, 2)), data.draw(st.integers(1, 5)))
    call = dict(q=torch.randn(b, h, dh), k=torch.randn(b, h, p + n, dh), num_prefix_tokens=p,
                scale=data.draw(st.sampled_from([None, 0.5, 1])), prior=None, out=None)
    alternatives = dict(
        q=[torch.randn(b, h + 1, dh), torch.randn(b, h, dh).double(), torch.randn(h, dh), torch.randn(b, h, dh).int()],
        k=[torch.randn(b, h, p + n, dh + 1), torch.randn(b, h, p + n, dh, device="meta"), torch.randn(b, h, p, dh)],
        num_prefix_tokens=[-1, p + n, p + 1, True, np.int64(p), 1.0],
        scale=[None, 2, 2.0, float("inf"), "x", True, -0.0],
        prior=[torch.randn(b, n), torch.randn(b, n + 1), torch.randn(b, n, device="meta")],
        out=[torch.zeros(b, n), torch.zeros(b, n + 1), torch.zeros(b, n, dtype=torch.float16)],
    )
    args = lambda c: (c["q"], c["k"], c["num_prefix_tokens"], c["scale"], c["prior"], c["out"])  # noqa: E731
    for _ in range(2):
        assert_agree(outcome(cache.cached_cls_attention_args, *args(call)), outcome(check_cls_attention_args, *args(call)))
    field = data.draw(st.sampled_from(sorted(alternatives)))
    changed = dict(call, **{field: data.draw(st.sampled_from(alternatives[field]))})
    assert_agree(outcome(cache.cached_cls_attention_args, *args(changed)), outcome(check_cls_attention_args, *args(changed)))


@settings(max_examples=150, **SETTINGS)
@given(data=st.data())
def test_random_mask_tokens_fast_path_agrees_with_the_full_check(data):
    p, side = data.draw(st.integers(0, 2)), data.draw(st.integers(1, 3))
    x = torch.randn(2, p + side * side, 3)
    grid = data.draw(st.sampled_from([None, (side, side), [side, side]]))
    alternatives = [(x[0], p, grid), (x, -1, grid), (x, True, grid), (x, p, (side, side + 1)), (x, p, (1.0 * side, side)),
                    (x, p + 1, grid), (x.long(), p, grid), (x, np.int64(p), grid), (x, p, (side * side, 1))]
    for args in [(x, p, grid)] * 2 + [data.draw(st.sampled_from(alternatives))]:
        assert_agree(outcome(cache.cached_tokens, *args), outcome(check_tokens, *args))


def test_cache_is_bounded_and_first_in_first_out():
    cache.cached_tokens.cache_clear()
    xs = [torch.randn(1, 1 + n * n, 2) for n in range(1, cache.MAXSIZE + 12)]
    for x in xs:
        cache.cached_tokens(x, 1, None)
    assert cache.cached_tokens.cache_len() == cache.MAXSIZE
    assert cache.cached_tokens(xs[-1], 1, None) == (1, (len(xs), len(xs)))


def test_uncacheable_arguments_run_the_full_check_every_time():
    """A numpy int, a bool, a torch.Size: checked, never cached (their equal values may check differently)."""
    cache.cached_tokens.cache_clear()
    x = torch.randn(2, 17, 3)
    assert cache.cached_tokens(x, np.int64(1), None) == (1, (4, 4))
    assert cache.cached_tokens(x, 1, torch.Size([4, 4])) == (1, (4, 4))
    with pytest.raises(TypeError, match="num_prefix_tokens must be an int"):
        cache.cached_tokens(x, True, None)
    assert cache.cached_tokens.cache_len() == 0
    assert cache.cached_tokens(x, 1, (4, 4)) == (1, (4, 4)) and cache.cached_tokens.cache_len() == 1


def test_an_error_is_never_cached():
    x, scores = torch.randn(4, 17, 8), torch.randn(2, 16)
    for _ in range(2):
        with pytest.raises(ValueError, match="keep=17 units"):
            ak.attentive_mask(x, scores, 17)
    ak.attentive_mask(x, scores, 16)
    with pytest.raises(ValueError, match="boxes must be finite"):  # a value check: per call, behind a cached entry
        ak.attentive_mask(x, scores, 16, boxes=torch.full((4, 4), float("nan")), backend="torch")


def test_while_compiling_the_check_runs_uncached(monkeypatch):
    """torch.compile traces the public function: symbolic sizes are unhashable, so no key is built."""
    cache.cached_tokens.cache_clear()
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    assert cache.cached_tokens(torch.randn(2, 17, 3), 1, None) == (1, (4, 4))
    assert cache.cached_tokens.cache_len() == 0


@pytest.mark.parametrize("field,first,second", [
    ("keep", 1, 1.0), ("keep", 1.0, 1), ("keep", 1, True), ("scale", 0.0, -0.0), ("scale", -0.0, 0.0),
    ("scale", 1, 1.0), ("block", 2, 2.0), ("num_prefix_tokens", 1, 1.0), ("grid", (4, 4), (4.0, 4)),
    ("grid", (4, 4), torch.Size([4, 4])),
])
def test_equal_values_of_another_type_or_sign_are_told_apart(field, first, second):
    """1 == 1.0 == True and 0.0 == -0.0 as dict keys: a call cached with one must not answer for the other."""
    cache.cached_mask_meta.cache_clear()
    x = torch.randn(2, 17, 4)
    base = dict(x=x, scores=None, q=torch.randn(2, 2, 4), k=torch.randn(2, 2, 17, 4), prior=None, keep=0.5,
                num_prefix_tokens=1, grid=None, block=1, boxes=None, scale=None)
    assert_agree(mask_fast(dict(base, **{field: first}), True), mask_full(dict(base, **{field: first}), True))
    assert_agree(mask_fast(dict(base, **{field: second}), True), mask_full(dict(base, **{field: second}), True))

"""The public ops' metadata checks, cached: a bounded cache in front of each check of ``_checks.py``
that decides from metadata alone, so that a training loop, which calls an op with the same shapes
again and again, pays for a dictionary lookup instead of the checks (issue #14).

A key holds everything its check reads: of each tensor its shape, dtype and device; of each other
argument its value, for the types whose equal values pass or fail every check alike (None, int,
float, a tuple or list of two ints). Any other argument (a numpy int, a bool, a torch.Size
grid, a non-tensor where a tensor belongs) makes the call uncacheable: the check runs. Only results
are cached, never errors, so a bad call runs the check, and raises its error, every time. While
torch.compile traces, the check runs uncached (symbolic sizes are unhashable; a trace runs once).
"""
from __future__ import annotations

import functools
from typing import Callable, Optional

import torch
from torch import Tensor

from ._checks import check_cls_attention_args, check_mask_meta, check_tokens

__all__ = ["MAXSIZE", "Uncacheable", "cached_cls_attention_args", "cached_mask_meta", "cached_tokens",
           "metadata_cache", "tensor_key"]

MAXSIZE = 256


class Uncacheable(Exception):
    """Raised by a key function for arguments it cannot key exactly."""


def metadata_cache(key: Callable[..., tuple], maxsize: int = MAXSIZE):
    """Decorates a check ``fn(*args)`` whose result depends only on ``key(*args)`` with a cache of its
    results by key, of at most ``maxsize`` entries, first in first out (an LRU update on every hit
    costs about 1 µs of the op's call, and a training loop has a handful of keys). ``cache_clear()``
    and ``cache_len()`` are attached; ``__wrapped__`` is ``fn``."""
    def decorate(fn):
        entries: dict = {}

        @functools.wraps(fn)
        def cached(*args):
            if torch.compiler.is_compiling():
                return fn(*args)
            try:
                k = key(*args)
                result = entries.get(k)
            except (Uncacheable, TypeError):  # TypeError: an unhashable part (symbolic sizes)
                return fn(*args)
            if result is None:
                result = entries[k] = fn(*args)
                if len(entries) > maxsize:
                    entries.pop(next(iter(entries)), None)  # None: popped meanwhile by another thread
            return result

        cached.cache_clear = entries.clear
        cached.cache_len = entries.__len__
        return cached
    return decorate


def tensor_key(t) -> Optional[tuple]:
    """What a check reads of a tensor argument (or None)."""
    if t is None:
        return None
    if isinstance(t, Tensor):
        return t.shape, t.dtype, t.device
    raise Uncacheable


_NUMBER = frozenset((int, float))


def is_int_pair(v) -> bool:
    """A tuple or list of two ints."""
    return type(v) in (tuple, list) and len(v) == 2 and type(v[0]) is int and type(v[1]) is int


# Each key takes the values of the scalar arguments only when they are of the plain types, whose
# equal values pass or fail every check alike (``check_real`` makes -0.0 0.0); ``keep`` with its
# type, as 1 == 1.0 but keep=1 is one unit where keep=1.0 is all of them.
def _mask_key(x, scores, keep, q, k, prior, num_prefix_tokens, grid, block, boxes, scale) -> tuple:
    if not (type(keep) in _NUMBER and type(num_prefix_tokens) is int and type(block) is int
            and (scale is None or type(scale) in _NUMBER) and (grid is None or is_int_pair(grid))):
        raise Uncacheable
    t = tensor_key
    return (t(x), t(scores), t(q), t(k), t(prior), t(boxes), keep, type(keep), num_prefix_tokens, block, scale,
            None if grid is None else tuple(grid))


def _cls_attention_key(q, k, num_prefix_tokens, scale, prior, out) -> tuple:
    if not (type(num_prefix_tokens) is int and (scale is None or type(scale) in _NUMBER)):
        raise Uncacheable
    t = tensor_key
    return t(q), t(k), t(prior), t(out), num_prefix_tokens, scale


def _tokens_key(x, num_prefix_tokens, grid) -> tuple:
    if not (type(num_prefix_tokens) is int and (grid is None or is_int_pair(grid))):
        raise Uncacheable
    return tensor_key(x), num_prefix_tokens, None if grid is None else tuple(grid)


cached_mask_meta = metadata_cache(_mask_key)(check_mask_meta)
cached_cls_attention_args = metadata_cache(_cls_attention_key)(check_cls_attention_args)
cached_tokens = metadata_cache(_tokens_key)(check_tokens)

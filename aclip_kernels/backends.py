"""Which implementation runs an op: chosen by device and availability, or forced.

Backends: ``torch`` (the pure-PyTorch reference), ``cpu`` (compiled C++), ``cuda`` (compiled CUDA),
``triton`` (Triton kernels; on GPU, or on CPU under ``TRITON_INTERPRET=1`` for tests).
Force one per call with ``backend=...`` or for a whole run with ``ACLIP_KERNELS_BACKEND``.
"""
from __future__ import annotations

import importlib.util
import os
from typing import Optional

import torch

from ._library import LOAD_ERROR, compiled_backends

__all__ = ["BACKENDS", "ENV_VAR", "TRITON_MISSING", "available_backends", "resolve_backend"]

BACKENDS = ("torch", "cpu", "cuda", "triton")
ENV_VAR = "ACLIP_KERNELS_BACKEND"


if importlib.util.find_spec("triton") is None:
    TRITON_MISSING: Optional[str] = "the triton package is not installed"
elif importlib.util.find_spec("aclip_kernels.triton") is None:
    TRITON_MISSING = "this build of aclip_kernels has no Triton kernels"
else:
    TRITON_MISSING = None


def _triton_usable(device: torch.device) -> Optional[str]:
    """None when the Triton backend can run on ``device``, else the reason it cannot."""
    if TRITON_MISSING is not None:
        return TRITON_MISSING
    if device.type == "cuda":
        return None
    if device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1":
        return None
    return f"Triton runs CUDA tensors (or CPU tensors under TRITON_INTERPRET=1); got {device.type}"


def _unavailable_reason(backend: str, device: torch.device) -> Optional[str]:
    if backend == "torch":
        return None
    if backend == "triton":
        return _triton_usable(device)
    if backend not in compiled_backends():
        return LOAD_ERROR or f"aclip_kernels._C was built without the {backend} backend"
    if backend != device.type:
        return f"the {backend} backend runs {backend} tensors; got a tensor on {device}"
    return None


# os.environ.get costs about 1 µs for a name that is not set (a KeyError raised and caught inside);
# the mapping behind os.environ answers in tens of nanoseconds. CPython's ``_data``/``encodekey``,
# with os.environ.get wherever they are missing, and while torch.compile traces.
_ENVIRON_DATA = getattr(os.environ, "_data", None)
_ENV_KEY = os.environ.encodekey(ENV_VAR) if hasattr(os.environ, "encodekey") else None


def _backend_from_environment() -> Optional[str]:
    """``os.environ.get(ENV_VAR)``, read on every call (a run may set it after import)."""
    if _ENVIRON_DATA is None or _ENV_KEY is None or torch.compiler.is_compiling():
        return os.environ.get(ENV_VAR)
    raw = _ENVIRON_DATA.get(_ENV_KEY)
    return None if raw is None else os.environ.decodevalue(raw)


_FIXED = ("torch", "cpu", "cuda")  # available or not for good once the library is loaded (Triton reads the env)


def _once_per_key(decide):
    """``decide(*key)``, computed once per key and then read from a dict (its answer cannot change
    once the library is loaded); torch.compile calls it once while tracing."""
    answers: dict = {}

    @torch.compiler.assume_constant_result
    def decided(*key):
        try:
            return answers[key]
        except KeyError:
            answer = answers[key] = decide(*key)
            return answer
    decided.__doc__, decided.__name__ = decide.__doc__, decide.__name__
    return decided


@_once_per_key
def _fixed_reason(backend: str, device: torch.device) -> Optional[str]:
    """``_unavailable_reason`` of a backend of ``_FIXED``."""
    return _unavailable_reason(backend, device)


@_once_per_key
def _auto_backend(device: torch.device) -> str:
    """The compiled backend of the device, else triton on CUDA, else torch (none of it reads the
    environment)."""
    compiled = "cuda" if device.type == "cuda" else "cpu"
    if _unavailable_reason(compiled, device) is None:
        return compiled
    return "triton" if device.type == "cuda" and _triton_usable(device) is None else "torch"


def available_backends(device) -> list:
    """The backends that can run tensors on ``device``, in order of preference."""
    device = torch.device(device)
    preferred = ("cuda", "triton", "torch") if device.type == "cuda" else ("cpu", "triton", "torch")
    return [b for b in preferred if _unavailable_reason(b, device) is None]


def resolve_backend(backend: Optional[str], device: torch.device) -> str:
    """The backend to run on ``device``: ``backend``, else $ACLIP_KERNELS_BACKEND, else the best.

    Raises ValueError for an unknown name and RuntimeError for a backend that cannot run here.
    """
    if backend in _FIXED and _fixed_reason(backend, device) is None:  # the common case, decided once
        return backend
    source = "backend"
    if backend is None:
        backend, source = _backend_from_environment() or "auto", ENV_VAR
    if backend == "auto":
        return _auto_backend(device)
    if backend not in BACKENDS:
        raise ValueError(f"{source}={backend!r}: expected one of {BACKENDS + ('auto',)}")
    reason = _unavailable_reason(backend, device)
    if reason is not None:
        raise RuntimeError(f"{source}={backend!r} is not available: {reason}")
    return backend

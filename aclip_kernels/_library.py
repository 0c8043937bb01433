"""Loading the compiled op library (``aclip_kernels._C``) and reporting what it was built with.

The library registers the ``aclip_kernels::*`` ops with ``TORCH_LIBRARY`` when it is imported. If it
is missing, or was built against another torch, the package warns once and the ops run on the
pure-PyTorch reference: never a crash, never a silently wrong result.
"""
from __future__ import annotations

import functools
import importlib
import warnings
from typing import Optional

import torch

__all__ = ["compiled_library", "compiled_backends", "load_error"]

_ERROR: Optional[str] = None


@functools.lru_cache(maxsize=None)
def compiled_library():
    """The imported ``aclip_kernels._build_info`` module when ``_C`` loaded, else None (warns once)."""
    global _ERROR
    try:
        info = importlib.import_module("aclip_kernels._build_info")
    except ImportError:
        _ERROR = "the compiled library aclip_kernels._C is not built (pip install --no-build-isolation .)"
    else:
        built, running = info.TORCH_VERSION, torch.__version__
        if built.split("+")[0] != running.split("+")[0]:
            _ERROR = (f"aclip_kernels._C was built for torch {built} but torch {running} is running; "
                      "rebuild it (pip install --no-build-isolation --force-reinstall .)")
        else:
            try:
                importlib.import_module("aclip_kernels._C")
                return info
            except (ImportError, OSError) as exc:
                _ERROR = f"aclip_kernels._C failed to load: {exc}"
    warnings.warn(f"{_ERROR}; falling back to the pure-PyTorch reference (slow).",
                  RuntimeWarning, stacklevel=3)
    return None


def compiled_backends() -> tuple:
    """The compiled backends available: a subset of ("cpu", "cuda")."""
    info = compiled_library()
    if info is None:
        return ()
    return ("cpu", "cuda") if info.WITH_CUDA else ("cpu",)


def load_error() -> Optional[str]:
    """Why the compiled library is not in use, or None when it is."""
    compiled_library()
    return _ERROR

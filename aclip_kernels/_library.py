"""Loading the compiled op library (``aclip_kernels._C``) and reporting what it was built with.

The library registers the ``aclip_kernels::*`` ops with ``TORCH_LIBRARY`` when it is imported, which
happens once, when this module is imported. If it is missing, or was built against another torch,
the package warns once and the ops run on the pure-PyTorch reference: never a crash, never a
silently wrong result.
"""
from __future__ import annotations

import importlib
import warnings
from types import ModuleType
from typing import Optional, Tuple

import torch

__all__ = ["BUILD_INFO", "LOAD_ERROR", "compiled_backends"]


def _load() -> Tuple[Optional[ModuleType], Optional[str]]:
    try:
        info = importlib.import_module("aclip_kernels._build_info")
    except ImportError:
        return None, "the compiled library aclip_kernels._C is not built (pip install --no-build-isolation .)"
    built, running = info.TORCH_VERSION, torch.__version__
    if built.split("+")[0] != running.split("+")[0]:
        return None, (f"aclip_kernels._C was built for torch {built} but torch {running} is running; "
                      "rebuild it (pip install --no-build-isolation --force-reinstall .)")
    try:
        importlib.import_module("aclip_kernels._C")
    except (ImportError, OSError) as exc:
        return None, f"aclip_kernels._C failed to load: {exc}"
    return info, None


BUILD_INFO, LOAD_ERROR = _load()
if LOAD_ERROR is not None:
    warnings.warn(f"{LOAD_ERROR}; falling back to the pure-PyTorch reference (slow).",
                  RuntimeWarning, stacklevel=2)
_COMPILED = () if BUILD_INFO is None else (("cpu", "cuda") if BUILD_INFO.WITH_CUDA else ("cpu",))


def compiled_backends() -> tuple:
    """The compiled backends available: a subset of ("cpu", "cuda")."""
    return _COMPILED

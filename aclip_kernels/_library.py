"""Loading the compiled op library (``aclip_kernels._C``) and reporting what it was built with.

The library registers its CPU and CUDA implementations of the ``aclip_kernels::*`` ops (whose
schemas aclip_kernels/ops/ defines) when it is imported, which happens once, when this module is imported. If it is missing, or was built against another torch,
the package warns once and the ops run on the pure-PyTorch reference: never a crash, never a
silently wrong result. An install built without it on purpose (``ACLIP_KERNELS_BUILD_EXT=OFF``)
does not warn.
"""
from __future__ import annotations

import importlib
import warnings
from types import ModuleType
from typing import Optional, Tuple

import torch

__all__ = ["BUILD_INFO", "LOAD_ERROR", "PURE_PYTHON", "compiled_backends"]

_REBUILD = "pip install --no-build-isolation --force-reinstall ."


def _major_minor(version: str) -> str:
    return ".".join(version.split("+")[0].split(".")[:2])


def _load() -> Tuple[Optional[ModuleType], Optional[str], bool]:
    """(build info, why the library is not loaded, whether it was left out on purpose)."""
    try:
        info = importlib.import_module("aclip_kernels._build_info")
    except ImportError:
        return None, f"the compiled library aclip_kernels._C is not built ({_REBUILD})", False
    if not getattr(info, "BUILD_EXT", True):
        return None, "this install has no compiled library (built with ACLIP_KERNELS_BUILD_EXT=OFF)", True
    built, running = info.TORCH_VERSION, torch.__version__
    # torch keeps its C++ ABI within a minor release; the wheel's metadata requires the same pair.
    if _major_minor(built) != _major_minor(running):
        return None, (f"aclip_kernels._C was built for torch {built} but torch {running} is running; "
                      f"rebuild it against this torch ({_REBUILD})"), False
    try:
        importlib.import_module("aclip_kernels._C")
    except (ImportError, OSError) as exc:
        return None, f"aclip_kernels._C failed to load: {exc}", False
    return info, None, False


BUILD_INFO, LOAD_ERROR, PURE_PYTHON = _load()
if LOAD_ERROR is not None and not PURE_PYTHON:
    warnings.warn(f"{LOAD_ERROR}; falling back to the pure-PyTorch reference (slow).",
                  RuntimeWarning, stacklevel=2)
_COMPILED = () if BUILD_INFO is None else (("cpu", "cuda") if BUILD_INFO.WITH_CUDA else ("cpu",))


def compiled_backends() -> tuple:
    """The compiled backends available: a subset of ("cpu", "cuda")."""
    return _COMPILED

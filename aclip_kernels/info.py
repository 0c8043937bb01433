"""``python -m aclip_kernels.info``: versions, compiled backends, devices and the backend each op uses."""
from __future__ import annotations

import importlib
import os
import platform

import torch

from . import __version__
from ._library import BUILD_INFO, LOAD_ERROR, PURE_PYTHON, compiled_backends
from .backends import ENV_VAR, available_backends, resolve_backend


def _version(module: str) -> str:
    try:
        return getattr(importlib.import_module(module), "__version__", "installed")
    except Exception:              # any import failure means "not usable here"
        return "not installed"


def report() -> str:
    lines = [f"aclip_kernels {__version__}",
             f"python {platform.python_version()} ({platform.machine()})",
             f"torch {torch.__version__} (CUDA {torch.version.cuda or 'none'})"]
    for module in ("triton", "timm", "open_clip", "flash_attn", "xformers"):
        lines.append(f"{module} {_version(module)}")
    if BUILD_INFO is not None:
        lines.append(f"compiled library: built for torch {BUILD_INFO.TORCH_VERSION}, backends "
                     f"{', '.join(compiled_backends())}"
                     + (f", CUDA archs {BUILD_INFO.CUDA_ARCHS}" if BUILD_INFO.WITH_CUDA else ""))
        if not BUILD_INFO.WITH_CUDA and getattr(BUILD_INFO, "CUDA_STATUS", ""):
            lines.append(f"CUDA kernels: not built ({BUILD_INFO.CUDA_STATUS})")
    elif PURE_PYTHON:
        lines.append("compiled library: none, a pure-Python install (ACLIP_KERNELS_BUILD_EXT=OFF): the ops run "
                     "on the torch reference, and on the Triton kernels for CUDA tensors when triton is installed")
    else:
        lines.append(f"compiled library: not loaded ({LOAD_ERROR})")
    devices = ["cpu"] + [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    for device in devices:
        name = torch.cuda.get_device_name(device) if device.startswith("cuda") else platform.processor() or "cpu"
        chosen = resolve_backend(None, torch.device(device))
        lines.append(f"device {device} ({name}): backends {', '.join(available_backends(device))}; "
                     f"default {chosen}")
    lines.append(f"{ENV_VAR}={os.environ.get(ENV_VAR, '') or '(unset: auto)'}")
    return "\n".join(lines)


if __name__ == "__main__":
    print(report())

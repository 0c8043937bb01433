"""The torch requirement of a build, for scikit-build-core ([[tool.dynamic-metadata]] in pyproject.toml).

aclip_kernels._C is compiled against the torch installed in the build environment and loads only
with that torch's major.minor (C++ ABI and op schemas), so a wheel that carries it requires
``torch==<major>.<minor>.*``: installed next to another torch, pip says so instead of the package
falling back to the reference at run time. The sdist and a pure-Python build
(``ACLIP_KERNELS_BUILD_EXT=OFF``) require any supported torch.

A wheel with the extension cannot be built without torch, which pip's default isolated build
environment hides: that build stops here, before CMake runs, with the command that works.
"""
from __future__ import annotations

import os
import re
from typing import Any, Mapping

MIN_TORCH = (2, 11)
INSTALL_LINE = "pip install scikit-build-core cmake ninja && pip install --no-build-isolation ."
_FALSE = {"0", "off", "false", "no", "n", "f"}  # as pyproject.toml's override: if.env regex


def build_ext() -> bool:
    """Whether this build compiles aclip_kernels._C (ACLIP_KERNELS_BUILD_EXT, default ON)."""
    return os.environ.get("ACLIP_KERNELS_BUILD_EXT", "").strip().lower() not in _FALSE


def _installed_torch() -> tuple:
    try:
        import torch
    except ImportError as exc:
        raise SystemExit(
            f"aclip_kernels: the compiled library is built against the installed torch, but this build "
            f"environment has none ({exc}): pip builds in an isolated environment unless told not to. "
            f"With torch installed:\n    {INSTALL_LINE}\nor, without compiled kernels (the torch reference "
            "and the Triton kernels only):\n    ACLIP_KERNELS_BUILD_EXT=OFF pip install .") from None
    match = re.match(r"(\d+)\.(\d+)", torch.__version__)
    version = (int(match[1]), int(match[2])) if match else (0, 0)
    if version < MIN_TORCH:
        raise SystemExit(f"aclip_kernels needs torch >= {'.'.join(map(str, MIN_TORCH))}; "
                         f"the build environment has torch {torch.__version__}")
    return version


class Provider:
    """Sets ``dependencies``: the torch requirement, then the entry's ``requires`` (pyproject.toml)."""

    def __init__(self) -> None:
        self._state = "wheel"

    def build_state(self, state: str) -> None:
        self._state = state

    def dynamic_wheel(self, settings: Mapping[str, Any]) -> dict:
        return {"dependencies": True}  # the sdist cannot know the torch its wheel will be built against

    def dynamic_metadata(self, settings: Mapping[str, Any], project: Mapping[str, Any]) -> dict:
        if self._state == "sdist" or not build_ext():
            torch = f"torch>={'.'.join(map(str, MIN_TORCH))}"
        else:
            major, minor = _installed_torch()
            torch = f"torch=={major}.{minor}.*"
        return {"dependencies": [torch, *settings.get("requires", [])]}

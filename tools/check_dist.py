"""Checks the output of `make wheel`: python tools/check_dist.py DIST [--cuda-archs 90].

The sdist carries everything a build needs and declares its dependencies dynamic; the wheel carries
aclip_kernels._C built against the running torch, whose major.minor its metadata requires.
"""
from __future__ import annotations

import argparse
import ast
import re
import sys
import tarfile
import zipfile
from pathlib import Path

import torch

SDIST_FILES = ("pyproject.toml", "CMakeLists.txt", "cmake/cuda_probe/CMakeLists.txt", "tools/aclip_build_meta.py",
               "csrc/module.cpp", "aclip_kernels/__init__.py", "aclip_kernels/_build_info.py.in")


def _one(dist: Path, pattern: str) -> Path:
    found = sorted(dist.glob(pattern))
    if len(found) != 1:
        sys.exit(f"expected one {pattern} in {dist}, found {[p.name for p in found]}")
    return found[0]


def _constants(source: str) -> dict:
    return {node.targets[0].id: ast.literal_eval(node.value) for node in ast.parse(source).body
            if isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Name)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("dist", type=Path)
    parser.add_argument("--cuda-archs", default="", help="the CUDA kernels must be built for these (e.g. 80,90)")
    args = parser.parse_args()
    errors = []

    sdist = _one(args.dist, "*.tar.gz")
    with tarfile.open(sdist) as tar:
        names = {name.split("/", 1)[1] for name in tar.getnames() if "/" in name}
        pkg_info = tar.extractfile(f"{sdist.name[:-len('.tar.gz')]}/PKG-INFO").read().decode()
    errors += [f"{sdist.name} lacks {name}" for name in SDIST_FILES if name not in names]
    if "Dynamic: Requires-Dist" not in pkg_info:
        errors.append(f"{sdist.name}: PKG-INFO does not declare Requires-Dist dynamic")

    wheel = _one(args.dist, "*.whl")
    with zipfile.ZipFile(wheel) as whl:
        names = set(whl.namelist())
        metadata = whl.read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
        info = _constants(whl.read("aclip_kernels/_build_info.py").decode())
    if not any(re.fullmatch(r"aclip_kernels/_C\..*\.so", name) for name in names):
        errors.append(f"{wheel.name} has no aclip_kernels/_C*.so")
    major_minor = ".".join(torch.__version__.split("+")[0].split(".")[:2])
    pin = f"Requires-Dist: torch=={major_minor}.*"
    if pin not in metadata.splitlines():
        errors.append(f"{wheel.name}: METADATA lacks '{pin}': {re.findall(r'Requires-Dist: torch.*', metadata)}")
    if info.get("TORCH_VERSION") != torch.__version__:
        errors.append(f"{wheel.name}: built for torch {info.get('TORCH_VERSION')}, running {torch.__version__}")
    if args.cuda_archs and (not info.get("WITH_CUDA") or info.get("CUDA_ARCHS") != args.cuda_archs):
        errors.append(f"{wheel.name}: CUDA kernels {info.get('WITH_CUDA')} for {info.get('CUDA_ARCHS')!r} "
                      f"({info.get('CUDA_STATUS')}), expected archs {args.cuda_archs}")
    if errors:
        sys.exit("\n".join(errors))
    print(f"{sdist.name}: complete, dependencies dynamic; {wheel.name}: _C for torch {info['TORCH_VERSION']} "
          f"(CUDA kernels: {info['CUDA_ARCHS'] or 'none'}), requires torch=={major_minor}.*")


if __name__ == "__main__":
    main()

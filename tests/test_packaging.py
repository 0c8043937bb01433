"""Packaging: the `train` extra covers every package the trainer imports and the trainer names it when
one is missing; the torch requirement a build writes into the wheel (tools/aclip_build_meta.py); the
pure-Python build (ACLIP_KERNELS_BUILD_EXT=OFF) agrees with the compiled one on its switch and its
_build_info fields."""
import ast
import importlib.metadata
import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from aclip_kernels.train import _requirements

ROOT = Path(__file__).resolve().parents[1]


def _load_build_meta():
    spec = importlib.util.spec_from_file_location("aclip_build_meta", ROOT / "tools" / "aclip_build_meta.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _top_level_imports(path: Path):
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            yield from (alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            yield node.module.split(".")[0]


def _normalise(dist: str) -> str:
    return re.sub(r"[-_.]+", "-", dist).lower()


def _declared(extra):
    """The distributions aclip-kernels' installed metadata requires for ``extra`` (None: always)."""
    names = set()
    for requirement in importlib.metadata.requires("aclip-kernels") or []:
        marker = re.search(r'extra == "([^"]+)"', requirement)
        if (marker[1] if marker else None) == extra:
            names.add(_normalise(re.match(r"[A-Za-z0-9._-]+", requirement)[0]))
    return names


def test_every_third_party_import_of_the_trainer_is_a_train_requirement():
    imported = {name for path in (ROOT / "aclip_kernels" / "train").rglob("*.py") for name in _top_level_imports(path)}
    third_party = imported - set(sys.stdlib_module_names) - {"aclip_kernels", "torch", "numpy"}
    assert third_party <= set(_requirements.TRAIN_MODULES), sorted(third_party - set(_requirements.TRAIN_MODULES))


def test_the_train_extra_declares_the_trainer_requirements():
    assert {_normalise(dist) for dist in _requirements.TRAIN_MODULES.values()} <= _declared("train")
    assert {"torch", "numpy"} <= _declared(None)
    assert {"timm", "open-clip-torch"} <= _declared("models")
    assert {"transformers"} <= _declared("hf")


def test_the_package_imports_without_the_model_libraries():
    code = "import sys, aclip_kernels; print(sorted({'timm', 'open_clip', 'transformers'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_the_trainer_names_the_extra_when_a_package_is_missing(monkeypatch):
    monkeypatch.setitem(_requirements.TRAIN_MODULES, "aclip_no_such_module", "aclip-no-such-dist")
    with pytest.raises(ImportError, match=r"needs aclip-no-such-dist, .*pip install 'aclip-kernels\[train\]'"):
        _requirements.check_requirements()


_MAJOR_MINOR = ".".join(torch.__version__.split("+")[0].split(".")[:2])


@pytest.mark.parametrize("state,build_ext,torch_requirement", [
    ("wheel", None, f"torch=={_MAJOR_MINOR}.*"),
    ("metadata_wheel", "ON", f"torch=={_MAJOR_MINOR}.*"),
    ("editable", "1", f"torch=={_MAJOR_MINOR}.*"),
    ("sdist", None, "torch>=2.11"),
    ("wheel", "OFF", "torch>=2.11"),
    ("metadata_wheel", "false", "torch>=2.11"),
])
def test_a_wheel_with_the_library_requires_the_build_torch_major_minor(monkeypatch, state, build_ext,
                                                                        torch_requirement):
    meta = _load_build_meta()
    if build_ext is None:
        monkeypatch.delenv("ACLIP_KERNELS_BUILD_EXT", raising=False)
    else:
        monkeypatch.setenv("ACLIP_KERNELS_BUILD_EXT", build_ext)
    provider = meta.Provider()
    provider.build_state(state)
    assert provider.dynamic_metadata({"requires": ["numpy"]}, {}) == {"dependencies": [torch_requirement, "numpy"]}
    assert provider.dynamic_wheel({}) == {"dependencies": True}


def test_a_build_without_torch_stops_with_the_install_line(monkeypatch):
    meta = _load_build_meta()
    monkeypatch.delenv("ACLIP_KERNELS_BUILD_EXT", raising=False)
    monkeypatch.setitem(sys.modules, "torch", None)  # what an isolated build environment sees
    provider = meta.Provider()
    provider.build_state("metadata_wheel")
    with pytest.raises(SystemExit, match=re.escape(meta.INSTALL_LINE)):
        provider.dynamic_metadata({}, {})


def test_the_pure_python_build_agrees_with_the_compiled_one():
    tomllib = pytest.importorskip("tomllib")
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    (override,) = [o for o in config["tool"]["scikit-build"]["overrides"]
                   if "ACLIP_KERNELS_BUILD_EXT" in o["if"].get("env", {})]
    switch_off = re.compile(override["if"]["env"]["ACLIP_KERNELS_BUILD_EXT"])
    meta = _load_build_meta()
    for value in ("0", "off", "OFF", "False", "no", "N", "f", "1", "on", "ON", "yes", "true", "auto"):
        # scikit-build-core skips CMake exactly when the provider leaves the torch pin out
        assert bool(switch_off.search(value)) == (value.strip().lower() in meta._FALSE), value
    assert override["wheel"] == {"cmake": False, "py-api": "py3"}

    def names(source):
        return {node.targets[0].id for node in ast.parse(source).body if isinstance(node, ast.Assign)}
    (generated,) = override["generate"]
    assert names(generated["template"]) == names((ROOT / "aclip_kernels" / "_build_info.py.in").read_text()
                                                  .replace("@ACLIP_WITH_CUDA_PY@", "False"))

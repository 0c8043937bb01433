"""Where the ops are defined: each schema once, in aclip_kernels/ops/<op>.py, registered as such by the
compiled and the Triton backends; and a package whose modules import each other without a cycle."""
import ast
import importlib
import re
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Dict, List, Optional, Set

import pytest
import torch

import aclip_kernels as ak
from aclip_kernels.backends import TRITON_MISSING
from aclip_kernels.ops._define import NAMESPACE, SCHEMAS

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "aclip_kernels"
attentive_mask_module = importlib.import_module("aclip_kernels.ops.attentive_mask")  # the attribute is the op
cls_attention_module = importlib.import_module("aclip_kernels.ops.cls_attention")
OPS = {"cls_attention": cls_attention_module.SCHEMA, "attentive_mask": attentive_mask_module.SCHEMA,
       "attentive_mask_backward": attentive_mask_module.BACKWARD_SCHEMA}


def test_every_op_is_defined_once_in_its_module():
    assert SCHEMAS == OPS


@pytest.mark.parametrize("name", sorted(OPS))
def test_registered_schema_is_the_definition(name):
    op = getattr(torch.ops.aclip_kernels, name).default
    assert str(op._schema) == f"{NAMESPACE}::{name}{OPS[name]}"
    for key in ("CPU",) if "cpu" in ak.compiled_backends() else ():
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"{NAMESPACE}::{name}", key)


@pytest.mark.skipif(TRITON_MISSING is not None, reason=f"{TRITON_MISSING}")
@pytest.mark.parametrize("name", sorted(OPS))
def test_triton_op_has_the_same_schema(name):
    op = getattr(torch.ops.aclip_kernels, f"{name}_triton").default
    assert str(op._schema) == f"{NAMESPACE}::{name}_triton{OPS[name]}"


@pytest.mark.skipif(TRITON_MISSING is not None, reason=f"{TRITON_MISSING}")
@pytest.mark.parametrize("name", sorted(OPS))
def test_triton_op_exposes_its_kernel(name):
    """torch.compile's caches key a triton_op on the kernels it finds in the op's body: the launcher
    called from ops/<op>.py must lead it to every kernel it launches (torch versions that record
    them): the fused attentive_mask also launches the scoring and combine kernels."""
    record = getattr(importlib.import_module("torch._library.triton"), "get_triton_kernels_for_op", None)
    if record is not None:
        expected = {"attentive_mask": 3, "attentive_mask_backward": 1, "cls_attention": 2}
        assert len({id(k) for k in record(f"{NAMESPACE}::{name}_triton")}) == expected.get(name, 1)


def test_csrc_defines_no_schema():
    """The C++ sources register implementations only (TORCH_LIBRARY_IMPL), never a schema."""
    for path in sorted((ROOT / "csrc").rglob("*")):
        if path.suffix in (".cpp", ".cu", ".h", ".cuh"):
            text = path.read_text()
            assert not re.search(r"TORCH_LIBRARY(_FRAGMENT)?\s*\(|\.def\s*\(", text), path


# ---- import graph ---------------------------------------------------------------------------

def _module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _resolve(module: str, is_package: bool, level: int, name: Optional[str]) -> str:
    if level == 0:
        return name or ""
    base = module.split(".")
    base = base if is_package else base[:-1]
    base = base[:len(base) - (level - 1)]
    return ".".join(base + ([name] if name else []))


def import_graph(root: Path) -> Dict[str, Set[str]]:
    """module -> the package modules it imports, anywhere in its body (deferred imports included,
    and ``importlib.import_module`` with a constant name). Importing ``a.b.c`` also runs the package
    ``a.b``, unless that package contains the importer (it is then already being imported)."""
    files = {_module_name(p, root): p for p in root.rglob("*.py")}
    top = root.name
    graph: Dict[str, Set[str]] = {}
    for module, path in files.items():
        is_package = path.name == "__init__.py"
        targets: List[str] = []
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets += [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = _resolve(module, is_package, node.level, node.module)
                targets += [f"{base}.{alias.name}" if f"{base}.{alias.name}" in files else base
                            for alias in node.names]
            elif (isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", None))
                  == "import_module" and node.args and isinstance(node.args[0], ast.Constant)):
                name = node.args[0].value
                level = len(name) - len(name.lstrip("."))
                targets.append(_resolve(module, is_package, level, name.lstrip(".")) if level else name)
        edges = set()
        for target in targets:
            parts = target.split(".")
            for i in range(1, len(parts) + 1):
                candidate = ".".join(parts[:i])
                if candidate in files and candidate != module and not module.startswith(candidate + "."):
                    edges.add(candidate)
        graph[module] = edges if module.split(".")[0] == top else set()
    return graph


def find_cycle(graph: Dict[str, Set[str]]) -> Optional[List[str]]:
    """A cycle of ``graph`` as [m0, m1, ..., m0], or None."""
    state: Dict[str, int] = {}
    stack: List[str] = []

    def visit(node: str) -> Optional[List[str]]:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_package_has_no_import_cycle():
    graph = import_graph(PACKAGE)
    assert "aclip_kernels.triton" in graph["aclip_kernels.ops.attentive_mask"]  # the graph sees the edges
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))


def test_the_cycle_check_sees_a_deferred_import(tmp_path):
    package = tmp_path / "pkg"
    (package / "sub").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "a.py").write_text("from .sub import b\n")
    (package / "sub" / "__init__.py").write_text("")
    (package / "sub" / "b.py").write_text("def f():\n    from .. import a\n")
    assert find_cycle(import_graph(package)) == ["pkg.a", "pkg.sub.b", "pkg.a"]
    (package / "sub" / "b.py").write_text("import importlib\nA = importlib.import_module('..c', __package__)\n")
    (package / "c.py").write_text("import pkg.a\n")
    assert find_cycle(import_graph(package)) == ["pkg.a", "pkg.sub.b", "pkg.c", "pkg.a"]


@pytest.mark.skipif(TRITON_MISSING is not None, reason=f"{TRITON_MISSING}")
def test_a_pure_python_install_defines_every_op_and_runs_triton():
    """Without the compiled library (ACLIP_KERNELS_BUILD_EXT=OFF) the schemas and the Triton ops are there."""
    script = textwrap.dedent("""
        import os, sys, types
        os.environ.setdefault("TRITON_INTERPRET", "1")
        fake = types.ModuleType("aclip_kernels._build_info")
        fake.BUILD_EXT = False
        sys.modules["aclip_kernels._build_info"] = fake
        import torch, aclip_kernels as ak
        assert ak.compiled_backends() == ()
        for name in ("cls_attention", "attentive_mask", "attentive_mask_backward"):
            assert getattr(torch.ops.aclip_kernels, name).default._schema is not None
            assert getattr(torch.ops.aclip_kernels, name + "_triton").default._schema is not None
        device = "cuda" if torch.cuda.is_available() else "cpu"
        x = torch.randn(2, 17, 4, device=device, requires_grad=True)
        kept, idx = ak.attentive_mask(x, torch.randn(2, 16, device=device), 4, backend="triton")
        kept.sum().backward()
        assert idx.shape == (2, 4) and float(x.grad.sum()) == 2 * 5 * 4
        print("ok")
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-2000:]

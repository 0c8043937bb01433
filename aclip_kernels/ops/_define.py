"""Defining the ``aclip_kernels::*`` op schemas (from Python, once) and their Triton ops.

Each op module defines its schemas here; the compiled library (``aclip_kernels._C``) registers only
implementations for them (``TORCH_LIBRARY_IMPL`` in csrc/cpu and csrc/cuda), and the Triton op of an
op is a ``triton_op`` with the same schema string under the name ``<op>_triton``.
"""
from __future__ import annotations

import contextlib
import importlib
from typing import Dict

import torch
from torch.library import triton_op

__all__ = ["NAMESPACE", "SCHEMAS", "define", "define_schemas", "register_triton_op"]

NAMESPACE = "aclip_kernels"
SCHEMAS: Dict[str, str] = {}
"""op name -> schema, every op the package defines (the compiled ones; a Triton op reuses the schema)."""

_LIBRARIES: Dict[str, torch.library.Library] = {}


def _library(namespace: str) -> torch.library.Library:
    if namespace not in _LIBRARIES:
        _LIBRARIES[namespace] = torch.library.Library(namespace, "FRAGMENT")
    return _LIBRARIES[namespace]


def define(name: str, schema: str) -> str:
    """Defines ``aclip_kernels::<name><schema>`` and returns its qualified name."""
    _library(NAMESPACE).define(name + schema)
    SCHEMAS[name] = schema
    return f"{NAMESPACE}::{name}"


def define_schemas(namespace: str) -> None:
    """Defines every schema of ``SCHEMAS`` again under ``namespace`` (once per process): for the test
    builds of csrc/ that register their implementations under a namespace of their own."""
    if namespace == NAMESPACE or namespace in _LIBRARIES:
        return
    for name, schema in SCHEMAS.items():
        _library(namespace).define(name + schema)


@contextlib.contextmanager
def _schema_honoured(schema: str):
    """Older torch's ``triton_op`` (2.11, for one) ignores its ``schema`` argument and infers a schema
    from the type annotations (``int`` -> ``SymInt``; fixed by pytorch/pytorch#188722): make that
    inference return ``schema``. Newer torch uses ``schema`` and never calls it, so nothing changes there."""
    try:
        module = importlib.import_module("torch._library.triton")
    except ImportError:
        module = None
    original = getattr(module, "infer_schema", None)
    if original is None:
        yield
        return
    module.infer_schema = lambda *args, **kwargs: schema
    try:
        yield
    finally:
        module.infer_schema = original


def register_triton_op(name: str):
    """``torch.library.triton_op`` named ``aclip_kernels::<name>_triton`` with the schema of op ``name``."""
    def dec(fn):
        with _schema_honoured(SCHEMAS[name]):
            return triton_op(f"{NAMESPACE}::{name}_triton", mutates_args=(), schema=SCHEMAS[name])(fn)
    return dec

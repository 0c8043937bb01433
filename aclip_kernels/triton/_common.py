"""Shared pieces of the Triton kernels: interpreter detection, autotuning and exact float32 arithmetic."""
from __future__ import annotations

import os
import threading
from typing import Optional

import torch
import triton
import triton.language as tl

from .._op_call import call_op

# triton.jit reads TRITON_INTERPRET when a kernel is defined, so this is fixed at import as well.
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


def _fix_interpreter_index() -> None:
    """Triton <= 3.6's interpreter turns a scalar into an index with ``int(array_of_one)``, which
    numpy >= 2.4 rejects, so ``range(runtime_arg)`` in a kernel fails (triton-lang/triton#9171,
    fixed in later Triton with ``.squeeze()``). When the installed interpreter has that bug, wrap its
    tensor patching to convert with ``.item()``; otherwise leave Triton alone."""
    import types

    import numpy as np
    from triton.runtime import interpreter

    patch_tensor, scope_cls = (getattr(interpreter, "_patch_lang_tensor", None),
                               getattr(interpreter, "_LangPatchScope", None))
    if patch_tensor is None or scope_cls is None:
        return
    scope = scope_cls()
    try:  # probe the interpreter's own conversion on a one-element array
        patch_tensor(tl.tensor, scope)
        index = tl.tensor.__index__
    except Exception:  # an interpreter this shim does not know: leave it alone
        return
    finally:
        scope.restore()
    try:
        index(types.SimpleNamespace(handle=types.SimpleNamespace(data=np.zeros(1, np.int32))))
        return  # this Triton/numpy pair converts one-element arrays
    except TypeError:
        pass
    except Exception:
        return

    def _patch_lang_tensor(tensor, scope):
        patch_tensor(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.item()))

    interpreter._patch_lang_tensor = _patch_lang_tensor


if INTERPRET:
    _fix_interpreter_index()

from torch.library import wrap_triton  # noqa: F401  (re-exported for the kernel modules)


def autotune(configs, key):
    """``triton.autotune``; the interpreter runs only the first config (benchmarking there is pointless)."""
    return triton.autotune(configs=configs[:1] if INTERPRET else configs, key=key)


def use_rn(device: torch.device) -> bool:
    """Whether kernels on ``device`` use explicit ``.rn`` PTX arithmetic (never fused into FMAs);
    the interpreter computes in numpy float32, where plain operators already round each result."""
    return not INTERPRET and device.type == "cuda" and torch.version.hip is None


def launch_options(device: torch.device) -> dict:
    """Launch options of the kernels with exact arithmetic: on ROCm, where they use plain operators,
    no FMA contraction (untested: no ROCm machine was available)."""
    if not INTERPRET and device.type == "cuda" and torch.version.hip is not None:
        return {"enable_fp_fusion": False}
    return {}


def check_device(t: torch.Tensor) -> None:
    """A clear error for CPU tensors when the kernels were not built for the interpreter."""
    if t.device.type != "cuda" and not INTERPRET:
        raise RuntimeError(f"the Triton kernels run CUDA tensors (got {t.device}); CPU tensors only "
                           "under TRITON_INTERPRET=1 set before aclip_kernels.triton is imported")


def next_pow2(n: int) -> int:
    """The smallest power of two >= max(n, 1), in integer bit arithmetic (``triton.next_power_of_2``
    costs microseconds per call)."""
    return 1 << (max(int(n), 1) - 1).bit_length()


def vector_width(t: torch.Tensor) -> int:
    """Elements per copy access of the rows of ``t`` [..., D] (unit last stride): the largest power of
    two up to 16 bytes that divides D, the other strides and the storage offset, so that a row copy
    compiles to accesses that wide for any D (D=100 fp32: 16 bytes; bf16: 8), not just D % 16 == 0.
    Storages are allocated aligned; an odd D leaves 1 (its rows are not aligned)."""
    if t.shape[-1] > 1 and t.stride(-1) != 1:
        return 1
    width = max(1, 16 // t.element_size())
    while width > 1 and (t.shape[-1] % width or t.storage_offset() % width
                         or any(s % width for s in t.stride()[:-1])):
        width //= 2
    return width


class _Checked(threading.local):
    active = False


_CHECKED = _Checked()


def call_checked(op, *args):
    """``op(*args)`` for arguments the public path has already checked: the op's Triton impl skips
    its own metadata checks (see ``consume_checked``). While torch.compile traces, a plain call."""
    if torch.compiler.is_compiling():
        return op(*args)
    _CHECKED.active = True
    try:
        return call_op(op, *args)
    finally:
        _CHECKED.active = False


def consume_checked() -> bool:
    """In an op impl: whether the public path checked this call's arguments. It holds for one op
    call only, so a nested or later direct call of a registered op is checked."""
    checked, _CHECKED.active = _CHECKED.active, False
    return checked


def cached(plan, *key):
    """``plan(*key)`` through its ``functools.lru_cache``; uncached for symbolic sizes while
    torch.compile traces (unhashable)."""
    try:
        return plan(*key)
    except TypeError:
        return plan.__wrapped__(*key)


def dummy(like: torch.Tensor, t: Optional[torch.Tensor]) -> torch.Tensor:
    """``t``, or a stand-in pointer for an argument the kernel does not read."""
    return like if t is None else t


# float32 a*b, a+b, a-b rounded to nearest, without flushing denormals: on CUDA as explicit
# ``.rn`` PTX, which neither LLVM nor ptxas contracts into an FMA (libdevice's ``__nv_fmul_rn``
# would flush denormals, as Triton compiles libdevice with FTZ); elsewhere plain operators.
@triton.jit
def _ptx_binary(op: tl.constexpr, a, b):
    a = tl.cast(a, tl.float32)  # not a.to(): torch 2.11's mutation analysis passes float arguments as
    b = tl.cast(b, tl.float32)  # Python constants, which have no .to()
    return tl.inline_asm_elementwise(op + " $0, $1, $2;", "=f,f,f", [a, b], dtype=tl.float32,
                                     is_pure=True, pack=1)


@triton.jit
def fmul(a, b, RN: tl.constexpr):
    if RN:
        return _ptx_binary("mul.rn.f32", a, b)
    else:
        return a * b


@triton.jit
def fadd(a, b, RN: tl.constexpr):
    if RN:
        return _ptx_binary("add.rn.f32", a, b)
    else:
        return a + b


@triton.jit
def fsub(a, b, RN: tl.constexpr):
    if RN:
        return _ptx_binary("sub.rn.f32", a, b)
    else:
        return a - b

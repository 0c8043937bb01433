"""The compile-facts table of the Triton kernels, without a GPU: each launched variant compiled for
sm_80, sm_90 (PTX, then ``ptxas -v``) and AMD gfx942 (AMDGCN), and per variant and target:

- registers (CUDA; VGPRs on AMD) and spills (bytes of spill stores on CUDA, spilled VGPRs + SGPRs on
  AMD, each with the scratch bytes);
- the widths in bytes of the global loads and stores of the row copies (``ld/st.global.v4.b32`` =
  16, AMD ``global_load_dwordx4`` = 16, a 2-byte scalar = 2), found through the ``.loc`` line info
  of the instructions (the copy lines of ``attentive_mask.py``);
- the barriers (``bar.sync``, ``s_barrier``) in the selection phase: the static count in the
  selection lines; the 32-step bitwise search is a runtime loop, so its body's barriers run per step.

    python -m aclip_kernels.triton.compile_facts --out benchmarks/results/compile_facts.md
           [--only KERNEL/VARIANT ...]      (TRITON_INTERPRET must be unset)
"""
from __future__ import annotations

import datetime
import inspect
import json
import re
import subprocess
import tempfile
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Tuple

import torch
import triton
from triton.backends.compiler import GPUTarget

from . import compile_check as cc

TARGETS = {"sm_80": GPUTarget("cuda", 80, 32), "sm_90": GPUTarget("cuda", 90, 32),
           "gfx942": GPUTarget("hip", "gfx942", 64)}
SOURCE = "attentive_mask.py"

# Next to compile_check's variants (8x8 grid, D = 64): D*itemsize 400 (a multiple of 16, not of 16
# elements) and 200 (a multiple of 8 only), and ViT-B/16's 14x14 grid with D = 768 in bf16.
EXTRA_MASK_VARIANTS = [(torch.float32, dict(block=1, boxes=False, width=100)),
                       (torch.bfloat16, dict(block=1, boxes=False, width=100)),
                       (torch.bfloat16, dict(block=1, boxes=False, width=768, hg=14)),
                       (torch.bfloat16, dict(block=2, boxes=True, width=768, hg=14))]


def _regions() -> Dict[str, set]:
    """Source lines of ``attentive_mask.py``: the selection phase and the row copies."""
    lines, first = inspect.getsourcelines(cc.am)
    text = [line.strip() for line in lines]

    def at(prefix: str, start: int = 0) -> int:
        return next(i for i in range(start, len(text)) if text[i].startswith(prefix)) + first

    selection = set(range(at("# Monotone keys"), at("# Ascending patch positions")))
    copy = set()
    for prefix in ("vals = tl.load(x_row", "vals = tl.load(src_row", "tl.store(kept_row", "tl.store(dst_row"):
        line = at(prefix)
        copy |= {line, line + 1}
    return {"selection": selection, "copy": copy}


_LOC = re.compile(r"^\s*\.loc\s+(\d+)\s+(\d+)\s+\d+(.*)$")
_FILE = re.compile(r'^\s*\.file\s+(\d+)\s+"([^"]*)"(?:\s+"([^"]*)")?')
_PTX_MEM = re.compile(r"\b(ld|st)\.global[.\w]*")
_AMD_MEM = re.compile(r"\b(?:global|buffer)_(load|store)_(dwordx(\d)|dword|b(\d+)|u?short|sshort|short_d16\w*|"
                      r"u?byte|sbyte)\b")
_BARRIER = re.compile(r"\bbar\.sync\b|\bbarrier\.sync\b|\bs_barrier\b")


def _ptx_bytes(op: str) -> int:
    vec = re.search(r"\.v(\d)", op)
    bits = re.findall(r"\.[bsuf](\d+)\b", op)
    return (int(vec.group(1)) if vec else 1) * int(bits[-1]) // 8 if bits else 0


def _amd_bytes(match: re.Match) -> int:
    kind = match.group(2)
    if match.group(3):
        return 4 * int(match.group(3))
    if match.group(4):
        return int(match.group(4)) // 8
    return 4 if kind == "dword" else 1 if "byte" in kind else 2


def attribute(asm: str, hip: bool) -> Dict[str, dict]:
    """Per region: {"ld": widths, "st": widths, "barriers": count} of the instructions whose line
    info (the innermost ``attentive_mask.py`` line of the ``.loc`` and its inlining chain; library
    helpers keep the last one) falls in the region."""
    files = {}
    for line in asm.splitlines():
        m = _FILE.match(line)
        if m:
            files[m.group(1)] = Path(m.group(3) or m.group(2)).name
    regions = _regions()
    out = {name: {"ld": set(), "st": set(), "barriers": 0} for name in regions}
    current, in_asm, asm_located = 0, False, False
    for line in asm.splitlines():
        if "begin inline asm" in line or "end inline asm" in line:
            # PTX line info inside an inline-asm block counts up from the statement's line: use its first
            in_asm, asm_located = "begin" in line, False
            continue
        m = _LOC.match(line)
        if m and in_asm and asm_located:
            continue
        if m:
            asm_located = in_asm
            pairs = [(files.get(m.group(1)), int(m.group(2)))]
            pairs += [(files.get(f), int(n)) for f, n in re.findall(r"inlined_at\s+(\d+)\s+(\d+)", m.group(3))]
            pairs += [(f, int(n)) for f, n in re.findall(r"(\w+\.py):(\d+)", m.group(3))]
            own = [n for f, n in pairs if f == SOURCE]
            if own:
                current = own[0]
            elif pairs[0][1] == 0:
                current = 0
            continue
        code = line.split("//")[0].split(";")[0]
        for name, lines in regions.items():
            if current not in lines:
                continue
            if _BARRIER.search(code):
                out[name]["barriers"] += 1
            for mem in (_AMD_MEM if hip else _PTX_MEM).finditer(code):
                direction = "ld" if mem.group(1) in ("ld", "load") else "st"
                out[name][direction].add(_amd_bytes(mem) if hip else _ptx_bytes(mem.group(0)))
    return out


def _ptxas_usage(ptx: str, arch: int) -> Tuple[int, int]:
    """(registers, spill-store bytes) from ``ptxas -v`` (Triton's own ptxas) on the PTX."""
    from triton.backends.nvidia.compiler import get_ptxas
    gpu = re.search(r"^\.target\s+(\w+)", ptx, re.M).group(1)
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "k.ptx"
        src.write_text(ptx)
        proc = subprocess.run([get_ptxas(arch).path, "-v", f"--gpu-name={gpu}", str(src), "-o", str(Path(tmp) / "k.o")],
                              capture_output=True, text=True, check=True)
    regs = int(re.search(r"Used (\d+) registers", proc.stderr).group(1))
    spills = sum(int(n) for n in re.findall(r"(\d+) bytes spill (?:stores|loads)", proc.stderr))
    return regs, spills


def _amd_usage(asm: str) -> Tuple[int, int]:
    """(VGPRs, spilled VGPRs + SGPRs) from the AMDGCN metadata."""
    def field(name):
        m = re.search(rf"\.{name}:\s+(\d+)", asm)
        return int(m.group(1)) if m else 0
    return field("vgpr_count"), field("vgpr_spill_count") + field("sgpr_spill_count")


def variant_list(subset: Optional[List[str]] = None) -> Iterator[tuple]:
    """compile_check's variants (first autotune config) plus EXTRA_MASK_VARIANTS; ``subset``: only
    "kernel/variant" names in it."""
    items = [(k, kern, v, rt, consts) for k, kern, v, rt, consts, _ in cc.variants()]
    for dtype, setting in EXTRA_MASK_VARIANTS:
        items.append(("attentive_mask_fwd", cc.am._mask_fwd_kernel, *cc._mask_variant(dtype, **setting)))
    for kernel_name, kernel, variant, runtime, consts in items:
        if subset is None or f"{kernel_name}/{variant}" in subset:
            yield kernel_name, kernel, variant, runtime, consts


def row_bytes(kernel_name: str, runtime: tuple) -> Optional[int]:
    """D * itemsize of the copied rows (None for the scoring kernels)."""
    if kernel_name.startswith("cls_"):
        return None
    x = runtime[0]
    return (x.shape[-1]) * x.element_size()


def facts(subset: Optional[List[str]] = None) -> Iterator[dict]:
    for kernel_name, kernel, variant, runtime, consts in variant_list(subset):
        config = kernel.configs[0]
        consts = dict(consts, **config.kwargs)
        for target_name, target in TARGETS.items():
            hip = target.backend == "hip"
            record = dict(kernel=kernel_name, variant=variant, target=target_name, config=str(config.kwargs),
                          num_warps=config.num_warps, row_bytes=row_bytes(kernel_name, runtime))
            options = {"num_warps": config.num_warps, "num_stages": config.num_stages}
            if hip and "RN" in consts:  # ROCm: plain operators without FMA contraction (``launch_options``)
                consts, options = dict(consts, RN=False), dict(options, enable_fp_fusion=False)
            compiled = triton.compile(cc._source(kernel, runtime, consts), target=target, options=options)
            asm = compiled.asm["amdgcn" if hip else "ptx"]
            regs, spills = _amd_usage(asm) if hip else _ptxas_usage(asm, target.arch)
            regions = attribute(asm, hip)
            record.update(registers=regs, spills=spills,
                          copy_ld=sorted(regions["copy"]["ld"]), copy_st=sorted(regions["copy"]["st"]),
                          selection_barriers=regions["selection"]["barriers"],
                          barriers=len(_BARRIER.findall(asm)))
            yield record


_CSRC = Path(__file__).resolve().parents[2] / "csrc" / "cuda"
_TYPES = {"h": "u8", "t": "u16", "j": "u32", "5uint2": "uint2", "5uint4": "uint4", "ff": "float",
          "dd": "double", "f": "float", "d": "double", "13__nv_bfloat16f": "bf16", "6__halff": "half"}


def _template_args(code: str) -> str:
    """The mangled template arguments of a kernel, readable: ``13__nv_bfloat16fLb1E`` -> ``bf16, true``."""
    flags = re.findall(r"Lb([01])E", code)
    code = re.sub(r"Lb[01]E", "", code)
    return ", ".join([_TYPES.get(code, code)] + ["true" if f == "1" else "false" for f in flags])


def _nvcc() -> Optional[Path]:
    import os
    nvcc = Path(os.environ.get("CUDA_HOME", "/usr/local/cuda")) / "bin" / "nvcc"
    return nvcc if nvcc.exists() else None


def cuda_facts(archs=(80, 90)) -> List[dict]:
    """Registers, spills and barriers of each CUDA kernel of csrc/cuda (``nvcc -Xptxas -v``), or []
    where nvcc or the sources (a source checkout) are missing."""
    nvcc = _nvcc()
    if nvcc is None or not _CSRC.is_dir():
        return []
    from torch.utils.cpp_extension import include_paths
    records = []
    for source in sorted(_CSRC.glob("*.cu")):
        for arch in archs:
            with tempfile.TemporaryDirectory() as tmp:
                proc = subprocess.run([str(nvcc), "-c", "-std=c++17", f"-arch=sm_{arch}", "-Xptxas", "-v",
                                       *(f"-I{p}" for p in include_paths()), str(source), "-o", f"{tmp}/k.o"],
                                      capture_output=True, text=True, check=True)
            for block in proc.stderr.split("Compiling entry function")[1:]:
                mangled = re.match(r"\s*'(\S+)'", block).group(1)
                m = re.search(r"\d+([a-z_]+kernel)I(\w+?)EEv", mangled)  # a length-prefixed name, then <args>
                name = f"{m.group(1)}<{_template_args(m.group(2))}>" if m else mangled
                regs = re.search(r"Used (\d+) registers", block)
                barriers = re.search(r"used (\d+) barriers", block)
                records.append(dict(source=source.name, kernel=name, target=f"sm_{arch}",
                                    registers=int(regs.group(1)) if regs else 0,
                                    spills=sum(int(n) for n in re.findall(r"(\d+) bytes spill (?:stores|loads)", block)),
                                    barriers=int(barriers.group(1)) if barriers else 0))
    return records


def cuda_markdown(records: List[dict]) -> str:
    lines = ["", "## CUDA kernels of csrc/cuda (`nvcc -Xptxas -v`)", "",
             "The attentive_mask kernels' template argument is the copy unit (u8 = 1 byte ... uint4 = 16 bytes); cls_attention_kernel's are the input type and the kernel's boolean template flag. Spills: bytes of "
             "spill stores + loads. Barriers: named barriers the kernel uses.", "",
             "| source | kernel | target | registers | spills | barriers |", "|---|---|---|---:|---:|---:|"]
    lines += [f"| {r['source']} | {r['kernel']} | {r['target']} | {r['registers']} | {r['spills']} | {r['barriers']} |"
              for r in records]
    return "\n".join(lines) + "\n"


def problems(records: List[dict]) -> List[str]:
    """A spill, or a row copy narrower than 16 bytes where D * itemsize is a multiple of 16."""
    found = []
    for r in records:
        if r["spills"]:
            found.append(f"{r['kernel']}/{r['variant']} on {r['target']}: {r['spills']} spilled")
        if r["row_bytes"] and r["row_bytes"] % 16 == 0 and min(r["copy_ld"] + r["copy_st"], default=0) < 16:
            found.append(f"{r['kernel']}/{r['variant']} on {r['target']}: row copy of {r['row_bytes']}-byte rows "
                         f"uses {r['copy_ld']}-byte loads and {r['copy_st']}-byte stores")
    return found


def markdown(records: List[dict]) -> str:
    def widths(w):
        return "/".join(map(str, w)) or "-"
    lines = ["# Compile facts of the Triton kernels", "",
             f"Generated {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, triton {triton.__version__}, "
             "without a GPU, by `python -m aclip_kernels.triton.compile_facts --out "
             "benchmarks/results/compile_facts.md` (first autotune config of each variant).",
             "Registers: per thread (VGPRs on gfx942). Spills: bytes of spill stores + loads (ptxas -v) on CUDA, "
             "spilled VGPRs + SGPRs on gfx942. Copy ld/st: widths in bytes of the global accesses on the row-copy "
             "lines. Sel. barriers: static count on the selection lines (per step of the runtime search loop); "
             "all barriers: in the whole kernel.", "",
             "| kernel | variant | D·itemsize | target | registers | spills | copy ld (B) | copy st (B) "
             "| sel. barriers | all barriers |", "|---|---|---:|---|---:|---:|---|---|---:|---:|"]
    for r in records:
        lines.append(f"| {r['kernel']} | {r['variant']} | {r['row_bytes'] or '-'} | {r['target']} | {r['registers']} "
                     f"| {r['spills']} | {widths(r['copy_ld'])} | {widths(r['copy_st'])} | {r['selection_barriers']} "
                     f"| {r['barriers']} |")
    bad = problems(records)
    lines += ["", "Problems (a spill, or a scalar copy of rows whose D·itemsize is a multiple of 16): "
              + ("none." if not bad else "; ".join(bad))]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    import argparse
    import sys
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None, help="the markdown file (JSON next to it); default: print")
    parser.add_argument("--only", nargs="+", default=None, metavar="KERNEL/VARIANT",
                        help="only these variants (e.g. attentive_mask_fwd/float32-b1), without the CUDA kernels")
    args = parser.parse_args(argv)
    if cc.INTERPRET:
        print("TRITON_INTERPRET=1 is set; unset it to compile", file=sys.stderr)
        return 2
    if args.only:
        known = {f"{name}/{variant}" for name, _, variant, _, _ in variant_list()}
        unknown = sorted(set(args.only) - known)
        if unknown:
            parser.error(f"--only: no variant named {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    return write(args.out, args.only)


def write(out: Optional[str] = None, subset: Optional[List[str]] = None) -> int:
    """Compile, print the JSON records, write the table; 1 if ``problems`` found any."""
    records = []
    for record in facts(subset):
        print(json.dumps(record), flush=True)
        records.append(record)
    text, cuda = markdown(records), []
    if subset is None:  # the full table: the CUDA kernels too (their spills are reported, not failed on)
        cuda = cuda_facts()
        text += cuda_markdown(cuda) if cuda else "\nCUDA kernels: nvcc or csrc/cuda not found, not compiled.\n"
    if out:
        Path(out).write_text(text)
        Path(out).with_suffix(".json").write_text(json.dumps(dict(triton=records, cuda=cuda), indent=1) + "\n")
    else:
        print(text)
    return 1 if problems(records) else 0


if __name__ == "__main__":
    raise SystemExit(main())

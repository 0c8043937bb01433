"""Ahead-of-time compilation of every Triton kernel variant the library launches, for given CUDA
architectures, without a GPU: ``triton.compile(ASTSource(...), target=GPUTarget("cuda", cc, 32))``.

    python -m aclip_kernels.triton.compile_check --cc 80 90      (TRITON_INTERPRET must be unset)

prints one JSON line per compiled variant (kernel, variant, cc, config, ok, error, counts of FMA,
mul.rn and ftz instructions, and of 16-byte global loads / stores).
The variants are built from real launch arguments (``forward_launch`` etc.), so their signatures
are the ones a launch would produce.
The compile-facts table (registers, spills, copy widths, barriers for sm_80, sm_90 and gfx942) is
``python -m aclip_kernels.triton.compile_facts`` (built on these variants).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Dict, Iterator, List, Tuple

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

import importlib
from ._common import INTERPRET

# The package re-exports functions under the submodules' names, so fetch the modules themselves.
am = importlib.import_module(".attentive_mask", __package__)
ca = importlib.import_module(".cls_attention", __package__)


def _source(kernel, runtime: tuple, constexprs: dict) -> ASTSource:
    """The ASTSource a launch with ``runtime`` arguments would compile: each argument specialised
    the way ``JITFunction.run`` does it (Triton's own ``specialize_impl``): ints equal to 1 become
    constexprs, and ints and data pointers divisible by 16 carry ``tt.divisibility`` (what lets the
    row copies become 16-byte vector accesses)."""
    from triton._C.libtriton import native_specialize_impl
    from triton.backends.nvidia.compiler import CUDABackend

    fn = kernel.fn  # the JITFunction under the autotuner
    signature, consts, attrs = {}, dict(constexprs), {}
    for i, (param, value) in enumerate(zip(fn.params, runtime)):
        annotation = param.annotation_type if isinstance(param.annotation_type, str) else ""
        if annotation == "u1" or annotation[:2] in ("fp", "bf"):
            signature[param.name] = annotation          # the JIT does not specialise these
            continue
        kind, desc = native_specialize_impl(CUDABackend, value, param.is_const, not param.do_not_specialize,
                                            not param.do_not_specialize_on_alignment)
        if kind == "constexpr":
            signature[param.name], consts[param.name] = "constexpr", desc
            continue
        signature[param.name] = annotation or kind
        if isinstance(desc, str):
            attrs[(i,)] = CUDABackend.parse_attr(desc)
    for name in fn.arg_names[len(runtime):]:
        signature[name] = "constexpr"
    return ASTSource(fn=fn, signature=signature, constexprs=consts, attrs=attrs)


def _mask_variant(dtype, block, boxes, coarse=False, width=64, hg=8):
    bs, views, p = 2, 2 if boxes else 1, 1
    x = torch.zeros(bs * views, p + hg * hg, width, dtype=dtype)
    hs = hg // 2 + 1 if coarse else hg
    scores = torch.zeros(bs, hs * hs)
    bx = torch.zeros(bs * views, 4) if boxes else None
    _, _, runtime, constexprs = am.forward_launch(x, scores, None, None, None, bx, p, (hs, hs), (hg, hg), block,
                                                  hg * hg // (2 * block * block), 0.25)
    constexprs["RN"] = True
    name = (f"{str(dtype)[6:]}-b{block}{'-boxes' if boxes else ''}{'-coarse' if coarse else ''}"
            f"{'' if width == 64 else f'-d{width}'}{'' if hg == 8 else f'-g{hg}'}")
    return name, runtime, constexprs


# The dtype x block x score-path variants compiled; (*) marks the one compiled with every config.
# (Fused q/k scores are the scoring kernel's launch, then one of these.)
MASK_VARIANTS = {
    torch.float32: [dict(block=1, boxes=False), dict(block=1, boxes=True), dict(block=1, boxes=False, coarse=True),
                    dict(block=2, boxes=False), dict(block=2, boxes=True), dict(block=2, boxes=False, coarse=True)],
    torch.float16: [dict(block=1, boxes=False), dict(block=1, boxes=True), dict(block=2, boxes=True)],
    torch.bfloat16: [dict(block=1, boxes=False), dict(block=2, boxes=True, all_configs=True)],
}
# Scoring: (name, heads, tokens, head dim); images B with the SM count of an H200 (132): B = 256
# gives G = 1, B = 64 G = 3 (ViT-B: 4 heads per group, ViT-L: 6), B = 8 one head per group. Plus
# small and long-head shapes.
SMS = 132
SCORE_MODELS = [("vitb", 12, 197, 64), ("vitl14", 16, 257, 64)]
SCORE_BATCHES = (256, 64)
SCORE_EXTRA = [("float32", "small", 4, 17, 16, 2, False), ("float64", "small", 4, 17, 16, 2, True),
               ("float64", "vitb", 12, 197, 64, 256, False), ("bfloat16", "vitb", 12, 197, 64, 8, True),
               ("float32", "dh320", 2, 33, 320, 256, False)]


def _score_variant(dtype, model, heads, tokens, dh, batch, prior):
    """(variant name, runtime args, constexprs) of a scoring launch at these shapes (sequence-first
    packed qkv strides, as timm's), planned for ``SMS`` SMs."""
    q = torch.zeros(batch, 3, heads, dh, dtype=dtype)[:, 0]
    k = torch.zeros(batch, tokens, 3, heads, dh, dtype=dtype).permute(2, 0, 3, 1, 4)[1]
    plan = ca.score_plan(batch, heads, tokens, dh, dtype == torch.float64, SMS, None)
    acc = ca.accumulation_dtype(q)
    n = tokens - 1
    out = torch.zeros(batch, n, dtype=acc) if plan["groups"] == 1 else torch.zeros(batch, plan["groups"], n, dtype=acc)
    logits = torch.zeros(batch, heads, n, dtype=acc)
    runtime = ca.launch_args(q, k, torch.zeros(batch, n) if prior else None, out, logits, 1, 0.125, plan)
    name = f"{str(dtype)[6:]}-{model}-B{batch}-g{plan['groups']}{'-prior' if prior else ''}"
    return name, runtime, ca.kernel_constexprs(plan, prior)


def _score_variants() -> Iterator[tuple]:
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        for model, heads, tokens, dh in SCORE_MODELS:
            for batch in SCORE_BATCHES:
                for prior in (False, True):
                    yield dtype, model, heads, tokens, dh, batch, prior
    for dtype, model, heads, tokens, dh, batch, prior in SCORE_EXTRA:
        yield getattr(torch, dtype), model, heads, tokens, dh, batch, prior


def variants() -> Iterator[Tuple[str, object, str, tuple, dict, bool]]:
    """(kernel name, autotuned kernel, variant, runtime args, constexprs, all configs)
    for the variants the library launches: every x dtype with block 1 and 2, boxes / coarse maps;
    the scoring kernel at ViT-B/16 and ViT-L/14 shapes with G = 1 and G > 1; the combine kernel."""
    for dtype, settings in MASK_VARIANTS.items():
        for setting in settings:
            setting = dict(setting)
            all_configs = setting.pop("all_configs", False)
            yield ("attentive_mask_fwd", am._mask_fwd_kernel, *_mask_variant(dtype, **setting), all_configs)
        grad = torch.zeros(4, 1 + 1000, 64, dtype=dtype)
        idx = torch.zeros(4, 1000, dtype=torch.int64)
        yield ("attentive_mask_bwd", am._mask_bwd_kernel, str(dtype)[6:], am.backward_args(grad, idx, grad, 1, 1000),
               {"VEC": am.vector_width(grad)}, dtype == torch.bfloat16)
    for setting in _score_variants():
        yield ("cls_scores", ca._cls_scores_kernel, *_score_variant(*setting), False)
    for dtype in (torch.float32, torch.float64):
        for prior in (False, True):
            partial, out = torch.zeros(64, 3, 196, dtype=dtype), torch.zeros(64, 196, dtype=dtype)
            prior_t = torch.zeros(64, 196) if prior else out
            yield ("cls_combine", ca._combine_kernel, f"{str(dtype)[6:]}{'-prior' if prior else ''}",
                   (partial, prior_t, out, 12, 196, 3, *prior_t.stride()),
                   {"HAS_PRIOR": prior, "BLOCK_N": 256}, False)


def compile_all(ccs: List[int], all_configs: bool = False) -> Iterator[Dict]:
    """Compile each variant with its first autotune config; the marked variants (all variants with
    ``all_configs``) with every config, on the newest of ``ccs``."""
    for kernel_name, kernel, variant, runtime, constexprs, every in variants():
        for config in (kernel.configs if every or all_configs else kernel.configs[:1]):
            consts = dict(constexprs, **config.kwargs)
            for cc in (ccs if config is kernel.configs[0] else ccs[-1:]):
                yield _compile_one(kernel_name, kernel, variant, runtime, consts, config, cc)


def _compile_one(kernel_name, kernel, variant, runtime, consts, config, cc) -> Dict:
    record = dict(kernel=kernel_name, variant=variant, cc=cc, config=str(config.kwargs),
                  num_warps=config.num_warps)
    start = time.time()
    try:
        compiled = triton.compile(_source(kernel, runtime, consts), target=GPUTarget("cuda", cc, 32),
                                  options={"num_warps": config.num_warps, "num_stages": config.num_stages})
        ptx = compiled.asm["ptx"]
        record.update(ok=True, cubin_bytes=len(compiled.asm["cubin"]), fma=ptx.count("fma.rn.f32"),
                      mul_rn=ptx.count("mul.rn.f32"),
                      # 16-byte global accesses (the row copies); Triton packs 16-bit elements in b32
                      ld_v4=ptx.count("ld.global.v4."), st_v4=ptx.count("st.global.v4."),
                      # flushing denormals changes results; floor (of a clamped pix >= 0) cannot
                      ftz=ptx.count(".ftz") - ptx.count("cvt.rmi.ftz.f32.f32"))
    except Exception as exc:  # reported; the caller fails on it
        record.update(ok=False, error=f"{type(exc).__name__}: {exc}"[-2000:])
    record["seconds"] = round(time.time() - start, 2)
    return record


def mutation_analysis(cc: int) -> Iterator[Dict]:
    """The tensors torch.compile's Triton mutation analysis thinks each variant writes (what it
    would clone); it walks every dataflow path of the kernel's TTIR, so it also guards against
    kernels whose analysis never finishes. Older torch (2.11) has ``identify_mutated_tensors``
    instead, which returns the written names (and every tensor argument if the analysis fails)."""
    from torch._higher_order_ops import triton_kernel_wrap as wrap

    if hasattr(wrap, "identify_accessed_tensors"):
        def writes(kernel, kwargs):
            return [dep.name for dep in wrap.identify_accessed_tensors(kernel, kwargs, {}).read_writes.writes]
    else:
        def writes(kernel, kwargs):
            return wrap.identify_mutated_tensors(kernel, kwargs, {})

    class _Target:  # the analysis asks the active driver for the target; there is no GPU here
        def get_current_target(self):
            return GPUTarget("cuda", cc, 32)

    triton.runtime.driver.set_active(_Target())
    for kernel_name, kernel, variant, runtime, constexprs, _ in variants():
        kwargs = dict(zip(kernel.fn.arg_names, runtime), **constexprs)
        start = time.time()
        written = writes(kernel, kwargs)
        yield dict(kernel=kernel_name, variant=variant, cc=cc, writes=sorted(written),
                   seconds=round(time.time() - start, 2))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cc", type=int, nargs="+", default=[80, 90])
    parser.add_argument("--all-configs", action="store_true")
    parser.add_argument("--mutation-analysis", action="store_true",
                        help="print what torch.compile's analysis thinks each variant writes instead")
    args = parser.parse_args(argv)
    if INTERPRET:
        print("TRITON_INTERPRET=1 is set; unset it to compile", file=sys.stderr)
        return 2
    if args.mutation_analysis:
        for record in mutation_analysis(args.cc[-1]):
            print(json.dumps(record), flush=True)
        return 0
    print(json.dumps({"autotune_configs": {"attentive_mask_fwd": len(am._mask_fwd_kernel.configs),
                                           "attentive_mask_bwd": len(am._mask_bwd_kernel.configs),
                                           "cls_scores": len(ca._cls_scores_kernel.configs),
                                           "cls_combine": len(ca._combine_kernel.configs)}}))
    ok = True
    for record in compile_all(args.cc, args.all_configs):
        ok &= record["ok"]
        print(json.dumps(record), flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

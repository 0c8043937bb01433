"""Every Triton kernel variant the library launches compiles to cubin for sm_80 and sm_90 on this
GPU-less machine (``python -m aclip_kernels.triton.compile_check``, in a subprocess without
TRITON_INTERPRET and with an empty Triton cache, arguments specialised as a launch specialises
them), the selection arithmetic compiles to explicitly rounded, non-FTZ float32 instructions with no
FMA, and the row copies are 16-byte vector accesses."""
import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")

CCS = (80, 90)


@pytest.fixture(scope="module")
def records(tmp_path_factory):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path_factory.mktemp("triton_cache"))
    proc = subprocess.run([sys.executable, "-m", "aclip_kernels.triton.compile_check", "--cc", *map(str, CCS)],
                          capture_output=True, text=True, env=env, timeout=900)
    lines = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    compiled = [r for r in lines if "kernel" in r]
    failed = [r for r in compiled if not r["ok"]]
    assert proc.returncode == 0 and compiled and not failed, (
        f"compile check exited {proc.returncode}; failures: {json.dumps(failed, indent=1)[:6000]}\n"
        f"stderr: {proc.stderr[-3000:]}")
    return compiled, next(r["autotune_configs"] for r in lines if "autotune_configs" in r)


def test_every_launched_variant_compiles_for_each_arch(records):
    seen = {(r["kernel"], r["variant"], r["cc"]) for r in records[0]}
    for cc in CCS:
        for dtype in ("float32", "float16", "bfloat16"):
            for block in (1, 2):
                assert any(k == "attentive_mask_fwd" and v.startswith(f"{dtype}-b{block}") and c == cc
                           for k, v, c in seen), (dtype, block, cc)
            scoring = [v for k, v, c in seen if k == "cls_scores" and c == cc]
            for model in ("vitb", "vitl14"):  # the scoring kernel (also the fused q/k path), G = 1 and G > 1
                for prior in (False, True):
                    groups = {v.split("-g")[1].split("-")[0] for v in scoring
                              if v.startswith(f"{dtype}-{model}-") and v.endswith("-prior") == prior}
                    assert "1" in groups and groups - {"1"}, (dtype, model, prior, groups)
            assert ("attentive_mask_bwd", dtype, cc) in seen
        for dtype in ("float32", "float16", "bfloat16", "float64"):
            assert any(k == "cls_scores" and v.startswith(dtype) and c == cc for k, v, c in seen), (dtype, cc)
        assert ("cls_combine", "float32-prior", cc) in seen
        for variant in ("float32-b2-boxes", "float32-b1-coarse"):
            assert ("attentive_mask_fwd", variant, cc) in seen


def test_every_autotune_config_compiles(records):
    compiled, config_counts = records
    configs = {(r["kernel"], r["config"], r["num_warps"]) for r in compiled}
    counts = {kernel: sum(1 for k, _, _ in configs if k == kernel) for kernel in config_counts}
    assert counts == config_counts, (counts, config_counts)
    assert min(counts["attentive_mask_fwd"], counts["attentive_mask_bwd"]) > 1, counts  # the autotuned ones


def test_selection_arithmetic_is_exactly_rounded(records):
    forward = [r for r in records[0] if r["kernel"] == "attentive_mask_fwd"]
    assert forward
    for r in forward:
        # No FMA contraction and no flush-to-zero arithmetic anywhere in the scores -> selection path.
        assert r["fma"] == 0 and r["ftz"] == 0, r
        if "boxes" in r["variant"] or "coarse" in r["variant"]:
            assert r["mul_rn"] > 0, r  # the alignment uses explicit mul.rn.f32


def test_row_copies_are_16_byte_vector_accesses(records):
    """Compiled as a launch specialises them (unit inner stride, 16-divisible widths, strides and
    pointers), the forward's prefix + kept-row copy and the backward's row writes use 16-byte
    global loads and stores (``ld/st.global.v4``), the wide copies the bandwidth targets need."""
    mask = [r for r in records[0] if r["kernel"] in ("attentive_mask_fwd", "attentive_mask_bwd")]
    assert mask
    for r in mask:
        assert r["ld_v4"] > 0 and r["st_v4"] > 0, r


def test_torch_compile_mutation_analysis_is_fast_and_precise():
    """torch.compile clones every tensor its analysis says a user kernel writes, and the analysis
    walks every dataflow path: the kernels must be analysable quickly, and never seem to write
    their inputs (x, q, k, prior, boxes, grad_kept)."""
    wrap = pytest.importorskip("torch._higher_order_ops.triton_kernel_wrap")
    if not any(hasattr(wrap, f) for f in ("identify_accessed_tensors", "identify_mutated_tensors")):
        pytest.skip("this torch has neither identify_accessed_tensors nor identify_mutated_tensors")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-m", "aclip_kernels.triton.compile_check", "--cc", "90",
                           "--mutation-analysis"], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    # scores: the analysis counts the score map as written (as before this kernel lost its fused
    # path); torch.compile then clones a [Bs, N] float map, not a tensor of tokens.
    allowed = {"attentive_mask_fwd": {"kept", "idx", "scores"}, "attentive_mask_bwd": {"grad_x"},
               "cls_scores": {"out", "logits"}, "cls_combine": {"out"}}
    assert {r["kernel"] for r in lines} == set(allowed)
    for r in lines:
        assert set(r["writes"]) <= allowed[r["kernel"]], r
        assert r["seconds"] < 20, r


# A few variants on every target of the compile-facts table (sm_80, sm_90, gfx942): a row width
# that is a multiple of 16 bytes but not of 16 elements, A-CLIP's ViT-B/16 mask variant, the
# backward, and the scoring kernel at ViT-B/16 (bf16, G = 1) and ViT-L/14 (fp16 + prior, G > 1).
FACT_VARIANTS = ("attentive_mask_fwd/float32-b1-d100", "attentive_mask_fwd/bfloat16-b2-boxes-d768-g14",
                 "attentive_mask_bwd/bfloat16", "cls_scores/bfloat16-vitb-B256-g1",
                 "cls_scores/float16-vitl14-B64-g3-prior")


def test_compile_facts_no_spills_and_vector_row_copies(tmp_path):
    """The compile-facts check (``python -m aclip_kernels.triton.compile_facts``): no variant
    spills, and every row copy whose D * itemsize is a multiple of 16 bytes uses 16-byte global
    accesses, on each target."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path / "cache")
    out = tmp_path / "facts.md"
    proc = subprocess.run([sys.executable, "-m", "aclip_kernels.triton.compile_facts", "--out", str(out),
                           "--only", *FACT_VARIANTS], capture_output=True, text=True, env=env, timeout=600)
    records = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert {(r["kernel"] + "/" + r["variant"], r["target"]) for r in records} == {
        (v, t) for v in FACT_VARIANTS for t in ("sm_80", "sm_90", "gfx942")}, proc.stderr[-3000:]
    assert proc.returncode == 0, out.read_text() if out.exists() else proc.stderr[-3000:]
    for r in records:
        assert r["spills"] == 0, r
        if r["kernel"].startswith("attentive_mask"):
            assert r["copy_ld"] and min(r["copy_ld"] + r["copy_st"]) == 16, r
    assert "| attentive_mask_fwd | float32-b1-d100 | 400 | sm_90 |" in out.read_text()

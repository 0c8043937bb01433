#!/usr/bin/env bash
# The one prepared GPU check, run on the lent H200 through the device tool (no internet there;
# torch 2.11 + triton 3.6 preinstalled). In about 5 minutes it builds the package with its CUDA
# kernels against that torch, runs the GPU tests, and the kernel benchmarks. Everything lands in
# $OUT (default benchmarks/results/gpu-<date>): gpu_check.log plus JSON + markdown per benchmark.
#
#   device run:  bash benchmarks/gpu_check.sh        (timeout_s ~420; carry .whl for open_clip)
#   smoke test on a CPU machine:  DEVICE=cpu OUT=/tmp/gpucheck bash benchmarks/gpu_check.sh
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
  $PY -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi

step "build (CUDA $( [ "$DEVICE" = cuda ] && echo ON || echo AUTO ))"
[ "$DEVICE" = cuda ] && export ACLIP_KERNELS_CUDA=ON
time $PY -m pip install -q --no-build-isolation --no-deps -e . || { echo "BUILD FAILED"; exit 1; }
$PY -m aclip_kernels.info

status=0
step "GPU tests"
timeout 240 $PY -m pytest -q -p no:cacheprovider -x tests/test_cuda.py tests/test_triton.py \
  tests/test_parity_cpu.py || status=1

step "benchmarks"
$PY benchmarks/bench_mask.py --device "$DEVICE" --dtype bf16 --images 256 --out "$OUT" || status=1
$PY benchmarks/bench_mask.py --device "$DEVICE" --dtype fp32 --images 64 --out "$OUT" || status=1
$PY benchmarks/bench_cls_attention.py --device "$DEVICE" --dtype bf16 --batch 256 --out "$OUT" || status=1
step "done (status $status)"
exit $status

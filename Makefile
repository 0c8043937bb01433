# `make demo` and `make test` do all the set-up on a fresh Linux machine with Python 3.10+:
# they create (or reuse) .venv, install the pinned dependencies and build the package.
PYTHON ?= python3
VENV ?= .venv
REQUIREMENTS ?= requirements/dev.txt
PY := $(VENV)/bin/python
SITE := $(shell $(PYTHON) -c "import sys; print(f'python{sys.version_info[0]}.{sys.version_info[1]}')")
CUDA_HOME ?= /usr/local/cuda
# The CUDA kernels build when nvcc and a CUDA build of torch are there (ACLIP_KERNELS_CUDA=AUTO|ON|OFF).
export CUDA_HOME
export CPATH := $(CURDIR)/$(VENV)/lib/$(SITE)/site-packages/nvidia/cu13/include$(if $(CPATH),:$(CPATH))
export TORCH_CUDA_ARCH_LIST ?= 8.0;9.0
export PATH := $(CUDA_HOME)/bin:$(PATH)

.PHONY: install demo test test-torch211 lint bench clean

$(VENV)/.deps: $(REQUIREMENTS) requirements/base.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r $(REQUIREMENTS)
	touch $@

# BUILD_DIR: a CMake build folder of its own for a second venv (another torch) in the same tree
$(VENV)/.built: $(VENV)/.deps pyproject.toml CMakeLists.txt $(shell find csrc cmake tools -type f) \
		aclip_kernels/_build_info.py.in
	$(if $(BUILD_DIR),SKBUILD_BUILD_DIR=$(BUILD_DIR) )$(PY) -m pip install -q --no-build-isolation --no-deps -e .
	touch $@

install: $(VENV)/.built

demo: install
	$(PY) -m aclip_kernels.train --method aclip --data embedded --output-dir runs/demo --save-masks

test: install
	$(PY) -m pytest -q

# pyflakes-level errors (unused or undefined names, syntax) in everything that is Python
lint: $(VENV)/.deps
	$(PY) -m ruff check --select F,E9 aclip_kernels benchmarks tests examples tools

# The whole suite again on the oldest supported versions (torch 2.11 / triton 3.6, what the GPU
# machine has), in .venv-torch211 with its own build folder; the CUDA kernels for sm_90 only.
test-torch211:
	$(MAKE) test VENV=.venv-torch211 REQUIREMENTS=requirements/torch211.txt BUILD_DIR=build/torch211 \
		TORCH_CUDA_ARCH_LIST=9.0

# `make bench`: every benchmark on this machine, results (JSON + markdown + plots) under $(BENCH_OUT):
# the op sweep (3 ViT shapes x batch 64/256 x fp32/bf16 x fwd/fwd+bwd), cls_attention, the EMA
# scorer, and the training-step table (ACLIP-Tiny at its demo batch; ViT-B-16 at a small batch).
# About 25 minutes on 2 CPU cores. Size it down, e.g.:
#   make bench BENCH_ROUNDS=2 BENCH_BATCHES=64 BENCH_STEP_ROUNDS=2 BENCH_VIT=0
BENCH_OUT ?= benchmarks/results
BENCH_DEVICE ?= cpu
BENCH_ROUNDS ?= 3
BENCH_BATCHES ?= 64,256
BENCH_STEP_ROUNDS ?= 3
BENCH_VIT ?= 1
BENCH_VIT_BATCH ?= 4
BENCH_VIT_SIZE ?= 224
BENCH_THREADS ?= 1

bench: install
	$(PY) benchmarks/bench_mask.py --sweep --device $(BENCH_DEVICE) --rounds $(BENCH_ROUNDS) --inner 1 \
		--batches $(BENCH_BATCHES) --out $(BENCH_OUT)
	$(PY) benchmarks/bench_cls_attention.py --device $(BENCH_DEVICE) --batch 64 --out $(BENCH_OUT)
	$(PY) benchmarks/bench_scorer.py --device $(BENCH_DEVICE) --repeats $(BENCH_ROUNDS) --micro-batch 4 --out $(BENCH_OUT)
	$(PY) benchmarks/bench_step.py --device $(BENCH_DEVICE) --model ACLIP-Tiny --batch 64 \
		--rounds $$(( 2 * $(BENCH_STEP_ROUNDS) )) --inner 2 --profile-steps 3 --threads $(BENCH_THREADS) --out $(BENCH_OUT)
	if [ "$(BENCH_VIT)" != 0 ]; then $(PY) benchmarks/bench_step.py --device $(BENCH_DEVICE) --model ViT-B-16 \
		--batch $(BENCH_VIT_BATCH) --image-size $(BENCH_VIT_SIZE) --rounds $(BENCH_STEP_ROUNDS) --warmup 1 \
		--threads $(BENCH_THREADS) --out $(BENCH_OUT); fi

# `make wheel`: an sdist and a wheel in $(DIST). The wheel is built from the unpacked sdist in a
# fresh folder (which proves the sdist complete) against this venv's torch, and requires its
# major.minor (pyproject.toml's dynamic dependencies).
DIST ?= dist
.PHONY: wheel
wheel: $(VENV)/.deps
	$(PY) -m build --no-isolation --outdir $(DIST) .

clean:
	rm -rf build dist $(VENV)/.built

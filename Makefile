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

PYTEST_ARGS ?=
# The suite over up to 4 processes (pytest-xdist; 6.5 instead of 10.5 minutes on 2 cores)
PYTEST_XDIST ?= -n auto --maxprocesses 4
test: install
	$(PY) -m pytest -q $(PYTEST_XDIST) $(PYTEST_ARGS)

# pyflakes-level errors (unused or undefined names, syntax) in everything that is Python
lint: $(VENV)/.deps
	$(PY) -m ruff check --select F,E9 aclip_kernels benchmarks tests examples tools

# The whole suite again on the oldest supported versions (torch 2.11 / triton 3.6, what the GPU
# machine has), in .venv-torch211 with its own build folder; the CUDA kernels for sm_90 only. The
# AddressSanitizer runs (the same C++ sources, 5 minutes) are left to `make test`.
test-torch211:
	$(MAKE) test VENV=.venv-torch211 REQUIREMENTS=requirements/torch211.txt BUILD_DIR=build/torch211 \
		TORCH_CUDA_ARCH_LIST=9.0 PYTEST_ARGS='-k "not under_asan"'


# `make bench`: every benchmark on this machine, results under $(BENCH_OUT): the op suite
# (pytest-benchmark; its JSON is kept as ops_$(BENCH_DEVICE).json and rendered to .md/.png by
# benchmarks/render.py), the EMA scorer, and the training-step table (ACLIP-Tiny at its demo batch;
# ViT-B-16 at a small batch). BENCH_FULL=1: the op suite's ViT sweep (3 shapes x 64/256 images x
# fp32/bf16). Size it down, e.g.:  make bench BENCH_ROUNDS=2 BENCH_STEP_ROUNDS=2 BENCH_VIT=0
BENCH_OUT ?= benchmarks/results
BENCH_DEVICE ?= cpu
BENCH_ROUNDS ?= 3
BENCH_FULL ?= 0
BENCH_STEP_ROUNDS ?= 3
BENCH_VIT ?= 1
BENCH_VIT_BATCH ?= 4
BENCH_VIT_SIZE ?= 224
BENCH_THREADS ?= 1
OPS_OPTIONS = --benchmark-only -q -p no:cacheprovider --bench-devices=$(BENCH_DEVICE) --bench-rounds=$(BENCH_ROUNDS)

bench: install
	ACLIP_BENCH_FULL=$(BENCH_FULL) $(PY) -m pytest benchmarks/ops $(OPS_OPTIONS) --benchmark-json=$(BENCH_OUT)/ops_$(BENCH_DEVICE).json
	$(PY) benchmarks/render.py $(BENCH_OUT)/ops_$(BENCH_DEVICE).json --out $(BENCH_OUT)
	$(PY) benchmarks/bench_scorer.py --device $(BENCH_DEVICE) --repeats $(BENCH_ROUNDS) --micro-batch 4 --out $(BENCH_OUT)
	$(PY) benchmarks/bench_step.py --device $(BENCH_DEVICE) --model ACLIP-Tiny --batch 64 \
		--rounds $$(( 2 * $(BENCH_STEP_ROUNDS) )) --inner 2 --profile-steps 3 --threads $(BENCH_THREADS) --out $(BENCH_OUT)
	if [ "$(BENCH_VIT)" != 0 ]; then $(PY) benchmarks/bench_step.py --device $(BENCH_DEVICE) --model ViT-B-16 \
		--batch $(BENCH_VIT_BATCH) --image-size $(BENCH_VIT_SIZE) --rounds $(BENCH_STEP_ROUNDS) --warmup 1 \
		--threads $(BENCH_THREADS) --out $(BENCH_OUT); fi

# `make bench-compare BASE=<git ref>`: the op suite of this tree against the library built at BASE
# and at HEAD, each from a git worktree under $(COMPARE_DIR) with its own CMake build folder and its
# own venv (seeing $(VENV)'s packages through a .pth file); then pytest-benchmark's comparison and
# a rendered table + plot in $(COMPARE_DIR). The same benchmark code times both libraries.
BASE ?= main
HEAD_REF ?= HEAD
COMPARE_DIR ?= build/bench-compare
.PHONY: bench-compare
bench-compare: $(VENV)/.deps
	set -e; for side in base head; do \
		if [ $$side = base ]; then ref=$(BASE); else ref=$(HEAD_REF); fi; \
		dir=$(COMPARE_DIR)/$$side; rm -rf $$dir/src; git worktree prune; mkdir -p $$dir; \
		git worktree add -q --detach $$dir/src $$ref; \
		test -x $$dir/venv/bin/python || $(PYTHON) -m venv --without-pip $$dir/venv; \
		echo "$(CURDIR)/$(VENV)/lib/$(SITE)/site-packages" > $$dir/venv/lib/$(SITE)/site-packages/main-venv.pth; \
		SKBUILD_BUILD_DIR=$(CURDIR)/$$dir/build $(PY) -m pip --python $$dir/venv/bin/python install -q \
			--no-build-isolation --no-deps --force-reinstall $$dir/src; \
		(cd $(COMPARE_DIR) && ACLIP_BENCH_LABEL="$$ref ($$(git rev-parse --short $$ref))" $(CURDIR)/$$dir/venv/bin/python -m pytest $(CURDIR)/benchmarks/ops $(OPS_OPTIONS) \
			--rootdir=$(CURDIR) --benchmark-json=$$side.json); \
		git worktree remove --force $$dir/src; \
	done
	$(PY) -c "import sys; from pytest_benchmark.cli import main; sys.argv[0] = 'pytest-benchmark'; main()" \
		compare $(COMPARE_DIR)/base.json $(COMPARE_DIR)/head.json --group-by=group --columns=min,median,iqr,rounds
	$(PY) benchmarks/render.py $(COMPARE_DIR)/base.json $(COMPARE_DIR)/head.json --out $(COMPARE_DIR) --name compare

# `make wheel`: an sdist and a wheel in $(DIST). The wheel is built from the unpacked sdist in a
# fresh folder (which proves the sdist complete) against this venv's torch, and requires its
# major.minor (pyproject.toml's dynamic dependencies).
DIST ?= dist
.PHONY: wheel
wheel: $(VENV)/.deps
	$(PY) -m build --no-isolation --outdir $(DIST) .

# ---- installs as a user makes them, outside the pinned .venv (CI) -------------------------------
# The system CMake (Debian 12's 3.25) and each job's own venv and build folder; the op tests (none
# needs timm, open_clip, torchvision or triton) run from build/, on the installed package.
SYSTEM_CMAKE ?= /usr/bin/cmake
.PHONY: test-install-cpu test-install-cuda-cmake
OP_TESTS := $(addprefix ../tests/,ops/test_attentive_mask.py ops/test_cls_attention.py ops/test_random_mask.py \
	ops/test_dispatch.py ops/test_errors.py ops/test_reference.py integrations/test_ema.py ops/test_cuda.py)

# CPU-only torch 2.13 in a fresh .venv-cpu213: pip install --no-build-isolation . with the system
# CMake and Ninja; `info` must show the compiled CPU kernels as the default.
test-install-cpu:
	test -x .venv-cpu213/bin/python || $(PYTHON) -m venv .venv-cpu213
	.venv-cpu213/bin/pip install -q -r requirements/install-cpu213.txt
	CMAKE_EXECUTABLE=$(SYSTEM_CMAKE) SKBUILD_BUILD_DIR=build/cpu213 .venv-cpu213/bin/pip install -q --no-build-isolation .
	cd build && ../.venv-cpu213/bin/python -m aclip_kernels.info | tee cpu213-info.txt
	grep -q "^device cpu .*default cpu$$" build/cpu213-info.txt
	cd build && ../.venv-cpu213/bin/python -m pytest -q -p no:cacheprovider $(OP_TESTS)

# The CUDA torch of $(VENV) with nvcc and the system CMake, without the Makefile's CPATH: the sdist
# and the wheel of `make wheel`, the CUDA kernels required (sm_90 only), checked by tools/check_dist.py.
# The wheel goes into .venv-cuda-cmake, which sees $(VENV)'s packages through a .pth file (not a
# second 5 GB torch); `info` must show both compiled backends.
test-install-cuda-cmake: export TORCH_CUDA_ARCH_LIST = 9.0
test-install-cuda-cmake: $(VENV)/.deps
	rm -rf dist/cuda-cmake
	env -u CPATH CMAKE_EXECUTABLE=$(SYSTEM_CMAKE) ACLIP_KERNELS_CUDA=ON \
		$(PY) -m build --no-isolation --outdir dist/cuda-cmake .
	$(PY) tools/check_dist.py dist/cuda-cmake --cuda-archs 90
	test -x .venv-cuda-cmake/bin/python || $(PYTHON) -m venv --without-pip .venv-cuda-cmake
	echo "$(CURDIR)/$(VENV)/lib/$(SITE)/site-packages" > .venv-cuda-cmake/lib/$(SITE)/site-packages/main-venv.pth
	$(PY) -m pip --python .venv-cuda-cmake/bin/python install -q --no-deps --force-reinstall dist/cuda-cmake/*.whl
	mkdir -p build && cd build && ../.venv-cuda-cmake/bin/python -m aclip_kernels.info | tee cuda-cmake-info.txt
	grep -q "^compiled library: built for torch .*, backends cpu, cuda, CUDA archs 90$$" build/cuda-cmake-info.txt
	cd build && ../.venv-cuda-cmake/bin/python -m pytest -q -p no:cacheprovider $(OP_TESTS)

clean:
	rm -rf build dist $(VENV)/.built

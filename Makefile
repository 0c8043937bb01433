# `make demo` and `make test` do all the set-up on a fresh Linux machine with Python 3.10+:
# they create (or reuse) .venv, install the pinned dependencies and build the package.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
SITE := $(shell $(PYTHON) -c "import sys; print(f'python{sys.version_info[0]}.{sys.version_info[1]}')")
CUDA_HOME ?= /usr/local/cuda
# The CUDA kernels build when nvcc and a CUDA build of torch are there (ACLIP_KERNELS_CUDA=AUTO|ON|OFF).
export CUDA_HOME
export CPATH := $(CURDIR)/$(VENV)/lib/$(SITE)/site-packages/nvidia/cu13/include$(if $(CPATH),:$(CPATH))
export TORCH_CUDA_ARCH_LIST ?= 8.0;9.0
export PATH := $(CUDA_HOME)/bin:$(PATH)

.PHONY: install demo test bench clean

$(VENV)/.deps: requirements/dev.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements/dev.txt
	touch $@

$(VENV)/.built: $(VENV)/.deps pyproject.toml CMakeLists.txt $(shell find csrc -type f) aclip_kernels/_build_info.py.in
	$(PY) -m pip install -q --no-build-isolation --no-deps -e .
	touch $@

install: $(VENV)/.built

demo: install
	$(PY) -m aclip_kernels.train --method aclip --data embedded --output-dir runs/demo --save-masks

test: install
	$(PY) -m pytest -q

bench: install
	$(PY) benchmarks/bench_mask.py

clean:
	rm -rf build $(VENV)/.built

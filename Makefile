# rank-dpo: every target does its own set-up on a fresh machine.
#   make demo   the whole method on the embedded tiny model and synthetic videos
#   make test   the test suite (what CI runs)
#   make bench  all benchmarks (bench-kernels, bench-train, bench-gen)
PY ?= python3
VENV := .venv
PYTHON := $(VENV)/bin/python

# The CUDA extension compiles wherever nvcc and a CUDA build of torch exist, GPU or not.
# Without a GPU torch cannot detect the architecture, so name Ampere and Hopper.
export CUDA_HOME ?= $(wildcard /usr/local/cuda)
export TORCH_CUDA_ARCH_LIST ?= 8.0;9.0
export PYTHONUNBUFFERED := 1

.PHONY: setup build test demo bench bench-kernels bench-train bench-gen clean

$(VENV)/.installed: requirements.txt constraints.txt
	$(PY) -m venv $(VENV)
	$(PYTHON) -m pip install -r requirements.txt -c constraints.txt
	touch $@

setup: $(VENV)/.installed

# Compile (or load from the cache) every kernel backend this machine can compile.
build: setup
	$(PYTHON) -m kernels --build

test: build
	$(PYTHON) -m pytest -q tests

bench: bench-kernels bench-train bench-gen

bench-kernels: build
	$(PYTHON) bench/bench_kernels.py

bench-train: build
	$(PYTHON) bench/bench_train.py

bench-gen: setup
	$(PYTHON) bench/bench_gen.py

clean:
	rm -rf runs build .pytest_cache bench/*.json
	find . -name __pycache__ -prune -exec rm -rf {} +

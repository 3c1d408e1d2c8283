# rank-dpo: every target does its own set-up on a fresh machine.
#   make demo   the whole method on the embedded tiny model and synthetic videos
#   make test   the test suite (what CI runs)
#   make bench  all benchmarks (bench-kernels, bench-train, bench-gen)
#   make gpu-check  everything that needs a GPU, one ~7.5-minute run (bench/GPU.md; no set-up:
#               see below); without a GPU, a dry run of its CPU-side parts
PY ?= python3
VENV := .venv
PYTHON := $(VENV)/bin/python

# CUDA_HOME and TORCH_CUDA_ARCH_LIST need no setting here: kernels/build.py finds the real
# toolkit (nvcc may be a wrapper script) and, only where no GPU is visible, builds for 8.0;9.0.
export PYTHONUNBUFFERED := 1

.PHONY: setup build test demo demo-readme demo-onpolicy sweep bench bench-kernels bench-train bench-gen \
	gpu-check gpu-wheels clean

# requirements.txt is the core (torch, transformers, peft, ...); requirements-real.txt the
# real-model extras (torchvision, Pillow, PyAV, timm, matplotlib), installed by default so that
# hub checkpoints and video files work after `make setup` and the tests cover them.
$(VENV)/.installed: requirements.txt requirements-real.txt constraints.txt
	$(PY) -m venv $(VENV)
	$(PYTHON) -m pip install -r requirements.txt -r requirements-real.txt -c constraints.txt
	touch $@

setup: $(VENV)/.installed

# Compile (or load from the cache) every kernel backend this machine can compile.
build: setup
	$(PYTHON) -m kernels --build

test: build
	$(PYTHON) -m pytest -q tests

# The whole pipeline on the embedded tiny model (scripts/demo.py; resumable: re-run after a kill).
demo: build
	$(PYTHON) scripts/demo.py --out runs/demo

# After `make demo` (and `make demo-onpolicy`): the README's demo (and on-policy) section
# rewritten from runs/demo/RESULTS.md (runs/demo_onpolicy/RESULTS.md); resumes, no retraining.
demo-readme: build
	$(PYTHON) scripts/demo.py --out runs/demo --readme README.md
	if [ -f runs/demo_onpolicy/RESULTS.md ]; then $(PYTHON) scripts/demo.py --onpolicy \
	    --out runs/demo_onpolicy --warm_from runs/demo --readme README.md; fi

# The paper's Table 1: caption chains against the on-policy pipelines (resumable; reuses the
# warm start of a finished `make demo`, else builds it the same way).
demo-onpolicy: build
	$(PYTHON) scripts/demo.py --onpolicy --out runs/demo_onpolicy --warm_from runs/demo

# The recipe sweep the demo's defaults come from (scripts/sweep.py; reuses the demo's data and warm start).
sweep: build
	$(PYTHON) scripts/sweep.py --demo_out runs/demo --out runs/sweep

bench: bench-kernels bench-train bench-gen

bench-kernels: build
	$(PYTHON) bench/bench_kernels.py

bench-train: build
	$(PYTHON) bench/bench_train.py

bench-gen: setup
	$(PYTHON) bench/bench_gen.py

# The GPU check (scripts/gpu_check.py): CUDA tests, the kernels' GPU benchmark beside Liger-Kernel's,
# one training step per model family and attention backend; bench/GPU.md + bench/gpu.json. No
# setup prerequisite: a lent GPU machine may have no network, so it runs with the venv where
# there is one, else with the machine's own python3 and torch (it compiles the kernels itself).
# Without a visible GPU it is a dry run of the CPU-side parts, and says so.
GPU_PY ?= $(if $(wildcard $(PYTHON)),$(PYTHON),$(PY))
gpu-check:
	$(GPU_PY) scripts/gpu_check.py

# Wheels for a GPU machine without network (pure Python; .whl/ is git-ignored): this project's
# transformers and peft pins, and Liger-Kernel for the side-by-side. Install there with
# pip install --no-index --no-deps --target DIR .whl/*.whl, then PYTHONPATH=DIR (README.md).
LIGER_VERSION ?= 0.8.5
gpu-wheels:
	$(PY) -m pip download --no-deps --only-binary=:all: -d .whl \
	    $(shell grep -E '^(transformers|peft)==' constraints.txt) liger-kernel==$(LIGER_VERSION)

clean:
	rm -rf runs build .pytest_cache bench/*.json
	find . -name __pycache__ -prune -exec rm -rf {} +

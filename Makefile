# Two commands on a fresh machine: `make demo` and `make test`. Both create .venv and build the extension.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# torch is pinned: this CPU build lies on the machine's disk; a looser spec can pull a multi-GB CUDA build.
DEPS := torch==2.13.0 "triton>=3.6,<3.10" numpy pytest pytest-benchmark ninja pybind11 setuptools wheel
SOURCES := setup.py pyproject.toml $(wildcard csrc/*.h csrc/*.cpp csrc/cpu/*.cpp csrc/cuda/*.cu csrc/cuda/*.cuh csrc/cuda/*.cpp)

.PHONY: demo test build clean

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

clean:
	rm -rf build *.egg-info tokencarve_kernels/_C*.so

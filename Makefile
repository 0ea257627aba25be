# speedasr — `make demo` trains a small model on the embedded corpus; `make test` runs the tests.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The CPU build of torch (this machine keeps its wheel in a local store). With a GPU, install the
# torch build you want into $(VENV) first (see README): setup keeps any torch already there.
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.speedasr-installed

# `make gpu-check` is the prepared GPU run (speedasr/bench/gpu.py; docs/benchmarks.md, "GPU check"):
# at most 8 minutes on one H100, setup included. It uses $(VENV) if that imports speedasr and torch
# (a machine without network needs it carried or built there, with the CUDA torch), else runs setup
# under a time limit: from PyPI, TORCH_SPEC's plain torch==2.13.0 is the CUDA build on Linux x86_64.
# `make gpu-check DRY_RUN=1` runs the same steps on CPU with tiny shapes (CI runs it).
GPU_CHECK_OUT ?= exp/gpu-check
GPU_SETUP_SECONDS ?= 100
DRY_RUN ?=

.PHONY: setup demo test lint bench gpu-check clean

setup: $(STAMP)

$(STAMP): pyproject.toml setup.py
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install "$(TORCH_SPEC)"
	$(BIN)/pip install -e ".[dev]"
	touch $(STAMP)

demo: setup
	PATH="$(CURDIR)/$(BIN):$$PATH" bash recipes/tiny/run.sh

test: setup
	$(BIN)/python -m pytest -q

lint: setup
	$(BIN)/ruff check speedasr kernels tests && $(BIN)/ruff format --check speedasr kernels tests

bench: setup
	PATH="$(CURDIR)/$(BIN):$$PATH" bash recipes/tiny/bench.sh

gpu-check:
	@if $(BIN)/python -c "import speedasr, torch" 2>/dev/null; then \
	  echo "gpu-check: using $(VENV): torch $$($(BIN)/python -c 'import torch; print(torch.__version__)')"; \
	else \
	  echo "gpu-check: $(VENV) cannot import speedasr and torch: make setup (needs PyPI), at most $(GPU_SETUP_SECONDS) s"; \
	  timeout $(GPU_SETUP_SECONDS) $(MAKE) setup || { \
	    echo "gpu-check: setup failed or took over $(GPU_SETUP_SECONDS) s. Without network, build $(VENV) where PyPI is reachable (with the CUDA torch) and carry it here" >&2; \
	    exit 1; }; \
	fi
	$(BIN)/speedasr bench gpu --out $(GPU_CHECK_OUT) $(if $(filter 1 yes true,$(DRY_RUN)),--dry-run)

clean:
	rm -rf $(VENV) exp data/tiny data/tiny-5h

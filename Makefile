# speedasr — `make demo` trains a small model on the embedded corpus; `make test` runs the tests.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The CPU build of torch (this machine keeps its wheel in a local store). With a GPU, install the
# torch build you want into $(VENV) first (see README): setup keeps any torch already there.
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.speedasr-installed

# `make gpu-check` is the prepared GPU run (speedasr/bench/gpu.py; docs/benchmarks.md, "GPU check"):
# at most 8 minutes on one H100, setup included. Its Python, in order: $(VENV) if it imports
# speedasr and torch; else GPU_PYTHON (the lent machines' image: CUDA torch, Lightning, triton) with
# the wheels of GPU_WHEELS_DIR (what that image lacks; `make gpu-wheels` fetches them where PyPI is
# reachable) installed into GPU_SITE; else `make setup` under a time limit (needs PyPI).
# `make gpu-check DRY_RUN=1` runs the same steps on CPU with tiny shapes (CI runs it).
GPU_CHECK_OUT ?= exp/gpu-check
GPU_SETUP_SECONDS ?= 100
GPU_PYTHON ?= python3
GPU_WHEELS_DIR ?= .whl
GPU_SITE ?= /tmp/speedasr-site
# speedasr's dependencies missing from the lent machines' image (Python 3.12; docs/benchmarks.md).
GPU_WHEELS := lhotse==1.33.0 jiwer==4.0.0 jsonargparse==4.53.0 espeakng-loader==0.2.4 \
  soundfile==0.14.0 cffi==2.1.1 pycparser==3.12 docstring-parser==0.18.0 typeshed-client==2.15.0 \
  rapidfuzz==3.14.6 audioread==3.1.0 cytoolz==1.2.0 intervaltree==3.2.1 \
  whisper-normalizer==0.1.15 regex==2026.12.2 more-itertools==11.2.1 text2num==3.1.0 \
  indic-numtowords==1.1.0
GPU_WHEEL_PLATFORMS := $(foreach p,manylinux_2_28 manylinux_2_27 manylinux_2_17 manylinux2014 \
  manylinux1,--platform $(p)_x86_64)
DRY_RUN ?=

.PHONY: setup demo test lint bench gpu-check gpu-wheels clean

setup: $(STAMP)

# ".[dev]": every extra (the demo synthesizes with espeakng-loader, the kernel tests run Triton's
# interpreter, profile plots with matplotlib) + pytest + ruff; `pip install .` alone is the core.
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
	  $(BIN)/speedasr bench gpu --out $(GPU_CHECK_OUT) $(GPU_CHECK_FLAGS); \
	elif [ -d "$(GPU_WHEELS_DIR)" ] && $(GPU_PYTHON) -c "import torch, pytorch_lightning" 2>/dev/null; then \
	  echo "gpu-check: using $(GPU_PYTHON) (torch $$($(GPU_PYTHON) -c 'import torch; print(torch.__version__)')) + $(GPU_WHEELS_DIR)/ -> $(GPU_SITE)"; \
	  $(GPU_PYTHON) -m pip install -q --no-index --no-deps --no-build-isolation --no-compile \
	    --upgrade --target $(GPU_SITE) $(GPU_WHEELS_DIR)/*.whl . || exit 1; \
	  rm -rf build; \
	  PYTHONPATH=$(GPU_SITE) $(GPU_PYTHON) -m speedasr.cli bench gpu --out $(GPU_CHECK_OUT) $(GPU_CHECK_FLAGS); \
	else \
	  echo "gpu-check: neither $(VENV) nor $(GPU_PYTHON) + $(GPU_WHEELS_DIR)/ can run speedasr: make setup (needs PyPI), at most $(GPU_SETUP_SECONDS) s"; \
	  timeout $(GPU_SETUP_SECONDS) $(MAKE) setup || { \
	    echo "gpu-check: setup failed or took over $(GPU_SETUP_SECONDS) s. Without network, run 'make gpu-wheels' where PyPI is reachable and bring $(GPU_WHEELS_DIR)/ along" >&2; \
	    exit 1; }; \
	  $(BIN)/speedasr bench gpu --out $(GPU_CHECK_OUT) $(GPU_CHECK_FLAGS); \
	fi
GPU_CHECK_FLAGS = $(if $(filter 1 yes true,$(DRY_RUN)),--dry-run)

# Python 3.12 x86_64 wheels of GPU_WHEELS into GPU_WHEELS_DIR (git-ignored; ~20 MB), for gpu-check
# on a machine that reaches no package index.
gpu-wheels:
	$(PYTHON) -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
	  --implementation cp $(GPU_WHEEL_PLATFORMS) -d $(GPU_WHEELS_DIR) $(GPU_WHEELS)

clean:
	rm -rf $(VENV) exp data/tiny data/tiny-5h

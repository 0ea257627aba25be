# speedasr — `make demo` trains a small model on the embedded corpus; `make test` runs the tests.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The CPU build of torch (this machine keeps its wheel in a local store). With a GPU, install the
# torch build you want into $(VENV) first (see README): setup keeps any torch already there.
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.speedasr-installed

.PHONY: setup demo test lint bench clean

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

clean:
	rm -rf $(VENV) exp data/tiny data/tiny-5h

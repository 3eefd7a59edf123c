# `make repro`: install into .venv and run the whole pipeline (real Food-101; needs internet).
# `make repro-sample`: the same pipeline offline, on the generated sample.
# `make test`: install into .venv and run the test suite (CPU, offline, a few minutes).
# `make ui`: the MLflow UI on the project's store (http://127.0.0.1:5000; PORT=... to change).
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

export PATH := $(abspath $(BIN)):$(PATH)

.PHONY: install repro repro-sample test test-fast ui bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

repro: $(STAMP)
	$(BIN)/dvc repro

repro-sample: $(STAMP)
	$(BIN)/dvc exp run -S data.source=sample

test: $(STAMP)
	$(BIN)/python -m pytest

test-fast: $(STAMP)
	$(BIN)/python -m pytest -m "not slow"

PORT ?= 5000
ui: $(STAMP)
	$(BIN)/foodtransfer ui --port $(PORT)

# `make bench`: the side-by-side speed and memory benchmark (bench/benchmark.py, ~45 min on 2 cores).
bench: $(STAMP)
	$(BIN)/python bench/benchmark.py

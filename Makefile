# `make repro`: install into .venv and run the whole pipeline (real Food-101; needs internet).
# `make repro-sample`: the same pipeline offline, on the generated sample.
# `make seeds`: the comparison over several training seeds (DVC queue), then compare them.
# `make test`: install into .venv and run the test suite (CPU, offline, a few minutes).
# `make ui`: the MLflow UI on the project's store (http://127.0.0.1:5000; PORT=... to change).
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

export PATH := $(abspath $(BIN)):$(PATH)

.PHONY: install repro repro-sample seeds test test-fast ui bench clean

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

# `make seeds SEEDS=1,2,3 SET="dropout=0.3"`: the whole comparison once per training seed, in
# DVC's own queue (one worker), then `foodtransfer compare` (reports/experiments.md). Only the
# training stages and the report re-run: the data and the features do not depend on `seed`.
SEEDS ?= 1,2,3
SET ?=
seeds: $(STAMP)
	$(BIN)/dvc exp run --queue -S 'seed=$(SEEDS)' $(foreach override,$(SET),-S '$(override)')
	$(BIN)/dvc exp run --run-all -j 1
	$(BIN)/foodtransfer compare

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

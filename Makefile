# `make repro`: install into .venv and run the whole pipeline (real Food-101; needs internet).
# `make repro-sample`: the same pipeline offline and small, on the generated sample.
# `make seeds`: the comparison over several training seeds (DVC queue), then compare them.
# `make sweep`: a grid of experiments on a Dask cluster (local by default), then compare them.
# `make test`: install into .venv and run the test suite (CPU, offline, a few minutes).
# `make ui`: the MLflow UI on the project's store (http://127.0.0.1:5000; PORT=... to change).
# `make demo`: the champion in a web page: upload a photo, see its top 5 classes.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin

# TensorFlow for this machine: the GPU build (tensorflow[and-cuda]) when `nvidia-smi -L` lists
# an NVIDIA GPU, the CPU build otherwise; `make install GPU=1` or `GPU=0` chooses. The stamp
# records the choice: another choice re-installs.
GPU ?= $(shell nvidia-smi -L 2>/dev/null | grep -q '^GPU ' && echo 1 || echo 0)
ifeq ($(filter 0 1,$(GPU)),)
$(error GPU=$(GPU): use GPU=1 (tensorflow[and-cuda]) or GPU=0 (tensorflow-cpu))
endif
TF_BUILD := $(if $(filter 1,$(GPU)),gpu,cpu)
STAMP := $(VENV)/.installed-$(TF_BUILD)

export PATH := $(abspath $(BIN)):$(PATH)

.PHONY: install repro repro-sample seeds sweep test test-fast ui demo bench bench-gpu clean

$(STAMP): pyproject.toml
	@echo "foodtransfer: TensorFlow for the $(if $(filter 1,$(GPU)),GPU: tensorflow[and-cuda],CPU: tensorflow-cpu) (GPU=$(GPU); make install GPU=0|1 chooses)"
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	if ls $(VENV)/.installed* >/dev/null 2>&1 && [ ! -e $(STAMP) ]; then \
	  echo "foodtransfer: switching TensorFlow builds: removing the installed one"; \
	  $(BIN)/python -m pip uninstall --quiet -y tensorflow tensorflow-cpu; \
	  rm -f $(VENV)/.installed*; fi
	$(BIN)/python -m pip install --quiet -e '.[dev,$(TF_BUILD),onnx,demo,sweep,team]'
	touch $(STAMP)

install: $(STAMP)

repro: $(STAMP)
	$(BIN)/dvc repro

# `make repro-sample`: the pipeline offline, on the generated sample, small enough for a CPU,
# on learnable weights made offline (foodtransfer sample-weights; DVC tracks the file).
SAMPLE_WEIGHTS := weights/sample-mobilenetv2.weights.h5
repro-sample: $(STAMP)
	test -f $(SAMPLE_WEIGHTS) || $(BIN)/foodtransfer sample-weights $(SAMPLE_WEIGHTS)
	$(BIN)/dvc add --quiet $(SAMPLE_WEIGHTS)
	git add $(SAMPLE_WEIGHTS).dvc $(dir $(SAMPLE_WEIGHTS)).gitignore  # queued experiments get it
	$(BIN)/dvc exp run -S data.source=sample -S backbone=MobileNetV2 \
	  -S weights=$(SAMPLE_WEIGHTS) -S image_size=64 -S baseline.image_size=64 -S epochs=20 \
	  -S baseline.epochs=3 -S finetune.epochs=1

# `make seeds SEEDS=1,2,3 SET="dropout=0.3"`: the whole comparison once per training seed, in
# DVC's own queue (one worker), then `foodtransfer compare` (reports/experiments.md) of exactly
# these experiments (named seeds-<time>-1, -2, ...). Params the workspace changed since the last
# commit are queued with them: the target prints them first. Only the training stages and the
# report re-run: the data and the features do not depend on `seed`.
SEEDS ?= 1,2,3
SET ?=
seeds: $(STAMP)
	@name=seeds-$$(date +%Y%m%d-%H%M%S); \
	changed=$$($(BIN)/dvc params diff 2>/dev/null); \
	if [ -n "$$changed" ]; then \
	  echo "foodtransfer: params.yaml differs from the last commit; the seeds run with it:"; \
	  echo "$$changed"; fi; \
	$(BIN)/dvc exp run --queue -n $$name -S 'seed=$(SEEDS)' \
	  $(foreach override,$(SET),-S '$(override)') || exit $$?; \
	$(BIN)/dvc exp run --run-all -j 1; \
	made=$$($(BIN)/dvc exp list --name-only | grep -E "^$$name(-[0-9]+)?$$" | sort -t- -k4 -n); \
	failed=$$($(BIN)/dvc queue status 2>/dev/null | awk -v n="$$name" \
	  '($$2 == n || index($$2, n "-") == 1) && $$NF == "Failed" {print $$2}'); \
	if [ -z "$$made" ]; then echo "foodtransfer: no experiment of $$name succeeded" \
	  "(dvc queue logs <name> says why)" >&2; exit 1; fi; \
	$(BIN)/foodtransfer compare $$made || exit $$?; \
	if [ -n "$$failed" ]; then echo "foodtransfer: failed, left out of the comparison:" \
	  $$failed "(dvc queue logs <name> says why)" >&2; exit 1; fi

# Two pytest workers, a test file each (--dist loadfile keeps a module's fixtures in one
# worker), the slowest files first (tests/conftest.py orders them; --no-loadscope-reorder keeps
# that order): the end-to-end files mostly wait on DVC, MLflow and process start-up.
test: $(STAMP)
	$(BIN)/python -m pytest -n 2 --dist loadfile --no-loadscope-reorder

test-fast: $(STAMP)
	$(BIN)/python -m pytest -m "not slow"

# `make sweep SWEEP="-S 'seed=1,2' -S 'dropout=0.3,0.6'"`: one DVC experiment per combination
# on a Dask cluster (a local one; SCHEDULER=tcp://host:8786 for a real one), then compare.
SWEEP ?= -S 'seed=1,2' -S 'dropout=0.3,0.6'
SCHEDULER ?=
sweep: $(STAMP)
	$(BIN)/foodtransfer sweep $(SWEEP) $(if $(SCHEDULER),--scheduler $(SCHEDULER))

PORT ?= 5000
ui: $(STAMP)
	$(BIN)/foodtransfer ui --port $(PORT)

# `make demo`: the champion in a web page (Gradio, http://127.0.0.1:7860; DEMO_PORT=... to change).
DEMO_PORT ?= 7860
demo: $(STAMP)
	$(BIN)/foodtransfer demo --port $(DEMO_PORT)

# `make bench`: the side-by-side speed and memory benchmark (bench/benchmark.py, ~45 min on 2 cores).
bench: $(STAMP)
	$(BIN)/python bench/benchmark.py

# `make clean`: remove the virtual environment and Python/pytest caches (not data/, mlruns/,
# models/ or reports/: those are DVC's and MLflow's, `dvc gc` and the MLflow UI manage them).
clean:
	rm -rf $(VENV) .pytest_cache src/*.egg-info
	find . -name __pycache__ -type d -prune -exec rm -rf {} +

# `make bench-gpu`: the whole pipeline at the reference size, per-stage time and GPU load
# (bench/gpu.py; on a GPU machine, where `make install` put tensorflow[and-cuda]).
bench-gpu: $(STAMP)
	$(BIN)/python bench/gpu.py

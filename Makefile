# Two commands on a fresh machine: `make train` runs the built-in default job,
# `make test` runs the checks CI runs. Each makes the virtual environment it needs.
PYTHON ?= python3
VENV ?= .venv
# The CPU build that this machine has on disk; elsewhere set TORCH= to keep the
# torch you have (pyproject.toml asks only for a range).
TORCH ?= torch==2.13.0
BIN := $(VENV)/bin

.PHONY: train test lint typecheck unit bench gpu-check clean

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(if $(TORCH),$(BIN)/python -m pip install -q $(TORCH))
	$(BIN)/python -m pip install -q -e '.[dev,hf]'
	touch $@

train: $(BIN)/.installed
	$(BIN)/bigbatch train $(ARGS)

test: lint typecheck unit

lint: $(BIN)/.installed
	$(BIN)/ruff check .

typecheck: $(BIN)/.installed
	$(BIN)/mypy bigbatch

unit: $(BIN)/.installed
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

bench: $(BIN)/.installed
	$(BIN)/python benchmarks/overhead.py

# Every GPU test and the GPT-2 benchmark in about 9 minutes, each result written as it comes
# (benchmarks/README.md, "GPU check"). On a GPU machine it runs the repository in place with
# that machine's python3 and its torch: no venv, no pip (GPU_PYTHON= to pick another).
# `make gpu-check DEVICE=cpu` runs the same script on a tiny model in .venv, in about a minute.
DEVICE ?= cuda
GPU_PYTHON ?= python3
ifeq ($(DEVICE),cpu)
GPU_CHECK_NEEDS := $(BIN)/.installed
GPU_CHECK_PYTHON := $(BIN)/python
else
GPU_CHECK_NEEDS :=
GPU_CHECK_PYTHON := PYTHONPATH=. $(GPU_PYTHON)
endif

gpu-check: $(GPU_CHECK_NEEDS)
	$(GPU_CHECK_PYTHON) benchmarks/gpu_check.py --device $(DEVICE) $(ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache

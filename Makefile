# Two commands on a fresh machine: `make train` runs the built-in default job,
# `make test` runs the checks CI runs. Each makes the virtual environment it needs.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
# The CPU build that this machine has on disk; elsewhere set TORCH= to keep the
# torch you have (pyproject.toml asks only for a range).
TORCH ?= torch==2.13.0
BIN := $(VENV)/bin
# The locked test environment: exact versions of every package the test venv holds
# (pip constraints; `make lock` refreshes it, docs/testing.md says when and how).
LOCK := constraints.txt

.PHONY: train test lint typecheck unit bench gpu-check clean test-latest lock

$(BIN)/.installed: pyproject.toml $(LOCK)
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(if $(TORCH),$(BIN)/python -m pip install -q -c $(LOCK) $(TORCH))
	$(BIN)/python -m pip install -q -c $(LOCK) -e '.[dev,hf]'
	touch $@

train: $(BIN)/.installed
	$(BIN)/bigbatch train $(ARGS)

test: lint typecheck unit

lint: $(BIN)/.installed
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: $(BIN)/.installed
	$(BIN)/mypy bigbatch

# Two pytest workers (pytest-xdist): CI's machine has 2 cores, and half the suite's time is
# processes starting (torchrun ranks, CLI runs), which one worker alone leaves a core idle for.
PYTEST_WORKERS ?= 2
unit: $(BIN)/.installed
	$(BIN)/python -m pytest -q -n $(PYTEST_WORKERS) --dist loadgroup $(PYTEST_ARGS)

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

# The same checks in a venv of its own with the newest versions pyproject.toml's ranges allow
# (no lock), so an upstream release that breaks us is seen the day someone runs this, not the
# day CI turns red. torch stays the build in TORCH (pip here offers only a multi-GB CUDA build
# as the newest); TORCH_LATEST=torch lets pip pick. The freeze it ran with: $(LATEST)/freeze.txt.
LATEST ?= .venv-latest
TORCH_LATEST ?= $(TORCH)
test-latest:
	rm -rf $(LATEST)
	$(PYTHON) -m venv $(LATEST)
	$(LATEST)/bin/python -m pip install -q --upgrade pip
	$(if $(TORCH_LATEST),$(LATEST)/bin/python -m pip install -q $(TORCH_LATEST))
	$(LATEST)/bin/python -m pip install -q --upgrade --upgrade-strategy eager $(if $(TORCH_LATEST),-c <(echo '$(TORCH_LATEST)')) -e '.[dev,hf]'
	$(LATEST)/bin/python -m pip freeze --exclude-editable > $(LATEST)/freeze.txt
	touch $(LATEST)/bin/.installed
	@echo "== versions that differ from $(LOCK) (< locked, > latest):"
	@diff <(grep -v '^#' $(LOCK) | sed 's/+cpu//' | sort -f) <(sed 's/+cpu//' $(LATEST)/freeze.txt | sort -f) | grep '^[<>]' || echo "   none"
	$(MAKE) test VENV=$(LATEST)

# Refresh the lock on purpose: the newest versions the ranges allow, as test-latest installed
# them (run `make test-latest` first and see it pass), written over $(LOCK).
lock:
	test -f $(LATEST)/freeze.txt || { echo "run 'make test-latest' first: the lock is what it tested"; exit 2; }
	{ sed -n '/^#/p' $(LOCK); sed 's/^torch==\([0-9.]*\)+cpu$$/torch==\1/' $(LATEST)/freeze.txt; } > $(LOCK).new
	mv $(LOCK).new $(LOCK)
	@echo "wrote $(LOCK); run 'make clean test' to test it from scratch, then commit it"

clean:
	rm -rf $(VENV) $(LATEST) .pytest_cache .mypy_cache .ruff_cache

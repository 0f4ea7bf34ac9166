# Two commands on a fresh machine: `make train` runs the built-in default job,
# `make test` runs the checks CI runs. Each makes the virtual environment it needs.
PYTHON ?= python3
VENV ?= .venv
# The CPU build that this machine has on disk; elsewhere set TORCH= to keep the
# torch you have (pyproject.toml asks only for a range).
TORCH ?= torch==2.13.0
BIN := $(VENV)/bin

.PHONY: train test lint typecheck unit bench clean

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

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache

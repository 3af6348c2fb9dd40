# The two commands a newcomer needs: `make run` and `make test`. Both set up .venv first.
.DEFAULT_GOAL := help
VENV ?= .venv
BIN := $(VENV)/bin
export OMP_NUM_THREADS ?= 2
export WANDB_SILENT ?= true
export PYTHONUNBUFFERED := 1

.PHONY: help setup run test lint typecheck test-fast test-slow lock bench clean

help:
	@echo "make run    - set up .venv and run the main job (a local swarm: 4 miners + a validator)"
	@echo "make test   - set up .venv and run lint, type check and tests"
	@echo "make test-slow - the slow tests (multi-process, long runs)"
	@echo "make lock   - regenerate constraints.txt from pyproject.toml"

setup:
	@bash tools/setup_env.sh

run: setup
	$(BIN)/covenant swarm --config swarm-cpu

lint: setup
	$(BIN)/ruff check engine plugins models src tools tests examples
	$(BIN)/ruff format --check engine plugins models src tools tests examples

typecheck: setup
	$(BIN)/mypy engine plugins models src

test-fast: setup
	$(BIN)/pytest -q -m "not slow and not gpu"

test: lint typecheck test-fast

test-slow: setup
	$(BIN)/pytest -q -m "slow and not gpu"

lock:
	uv pip compile pyproject.toml --extra dev --find-links /opt/wheels --python-version 3.11 \
	  --no-header --no-annotate -o constraints.txt
	sed -i 's/^torch==\(.*\)+cpu$$/torch==\1/' constraints.txt

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache build *.egg-info

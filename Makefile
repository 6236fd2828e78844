# The two commands a new user needs are `make demo` and `make test`.
PYTHON ?= python3.11
VENV   ?= .venv
BIN    := $(VENV)/bin

.PHONY: demo test lint typecheck pytest bench clean

# The worked example of a target plugin, installed beside reaper: tests run a policy of its kind.
EXAMPLE_PLUGIN := examples/reaper-example-target

$(BIN)/reaper: pyproject.toml $(EXAMPLE_PLUGIN)/pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	$(BIN)/pip install --quiet -e $(EXAMPLE_PLUGIN)
	touch $(BIN)/reaper

## demo: install, start the data_pipeline simulator, run the example policy against it (SQLite audit)
demo: $(BIN)/reaper
	$(BIN)/python -m reaper.demo

## test: install, lint, type-check and run the whole test suite (real PostgreSQL included)
test: lint typecheck pytest

lint: $(BIN)/reaper
	$(BIN)/ruff check reaper tests bench examples
	$(BIN)/ruff format --check reaper tests bench examples

typecheck: $(BIN)/reaper
	$(BIN)/mypy
	$(BIN)/mypy --strict $(EXAMPLE_PLUGIN)/reaper_example_target.py

# Tests run in 4 worker processes (each starts its own throwaway PostgreSQL); `make pytest
# PYTEST_ARGS="-p no:xdist -s tests/reliability"` runs in one process and prints the fault matrix.
PYTEST_ARGS ?= -n 4
pytest: $(BIN)/reaper
	$(BIN)/pytest $(PYTEST_ARGS)

## bench: run every benchmark and print the figures
bench: $(BIN)/reaper
	$(BIN)/python -m bench

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache reaper-demo

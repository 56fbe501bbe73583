# Two entry points: `make demo` runs the example app with its dashboard, `make test` runs the tests.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: install test lint demo screenshots clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

install: $(BIN)/python
	$(BIN)/pip install --quiet -e '.[dev]'

test: install
	$(BIN)/python -m pytest

lint: install
	$(BIN)/ruff check src tests benchmarks examples scripts
	$(BIN)/mypy

DEMO_DB := sqlite:///$(CURDIR)/examples/fastapi_app/usage.db

# The example upload API with its dashboard; a year of synthetic usage is written on first run.
demo: $(BIN)/python
	$(BIN)/pip install --quiet -e '.[examples]'
	$(BIN)/usage-middleware demo-data '$(DEMO_DB)' --if-empty
	DATABASE_URL='$(DEMO_DB)' $(BIN)/python examples/fastapi_app/app.py

# docs/dashboard.png and docs/dashboard-narrow.png from the example app over demo data (Chromium).
screenshots: install
	$(BIN)/python scripts/screenshots.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .hypothesis tests/browser/node/node_modules

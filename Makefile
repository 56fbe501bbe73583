# Two entry points: `make demo` runs the example app with its dashboard, `make test` runs the tests.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: install test lint demo demo-reset screenshots clean

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

DEMO_DIR := $(CURDIR)/examples/fastapi_app
DEMO_DB := sqlite:///$(DEMO_DIR)/usage.db

# The example upload API with its dashboard at http://127.0.0.1:8000 (PORT=... to change; Ctrl-C
# stops it). The first run writes a year of synthetic usage; later runs add the days since.
demo: $(BIN)/python
	$(BIN)/pip install --quiet -e '.[examples]'
	$(BIN)/usage-middleware demo-data '$(DEMO_DB)' --top-up
	DATABASE_URL='$(DEMO_DB)' $(BIN)/python examples/fastapi_app/app.py

# Forget the demo's usage database and uploaded files: the next `make demo` writes a fresh year.
demo-reset:
	rm -f $(DEMO_DIR)/usage.db $(DEMO_DIR)/usage.db-wal $(DEMO_DIR)/usage.db-shm
	rm -rf $(DEMO_DIR)/storage

# docs/dashboard.png and docs/dashboard-narrow.png from the example app over demo data (Chromium).
screenshots: install
	$(BIN)/python scripts/screenshots.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .hypothesis tests/browser/node/node_modules

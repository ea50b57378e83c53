# The README's commands. Everything runs from the virtualenv at .venv.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: demo test up down status setup lint typecheck pytest unit integration format clean

## demo: install, start Kafka + Redis + stages, send the digits held-out set, print a summary
demo: setup
	$(BIN)/streaminfer demo

## test: lint, type-check and run every test (starts Kafka and Redis if they are not running)
test: setup lint typecheck pytest

## up / down: start / stop the local stack in the background (idempotent)
up: setup
	$(BIN)/streaminfer up --wait

down: setup
	$(BIN)/streaminfer down

status: setup
	$(BIN)/streaminfer status

setup: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	touch $(STAMP)

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: setup
	$(BIN)/mypy

pytest: setup
	$(BIN)/pytest

unit: setup
	$(BIN)/pytest tests/unit

integration: setup
	$(BIN)/pytest tests/integration

format: setup
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

clean:
	rm -rf $(VENV) .run .pytest_cache .mypy_cache .ruff_cache

# The README's commands. Everything runs from the virtualenv at .venv.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: demo test up down status setup lock lock-upgrade config-doc lint typecheck pytest unit integration test-cluster format clean

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

# Installs exactly the locked versions (every transitive dependency pinned, hashes checked),
# then the project itself without resolving anything. The build backend is in the lock too, so
# nothing is fetched unpinned (--no-build-isolation).
$(STAMP): requirements-dev.lock pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --require-hashes -r requirements-dev.lock
	$(BIN)/pip install -q --no-deps --no-build-isolation -e .
	touch $(STAMP)

## lock: re-resolve the locks after editing pyproject.toml (keeps existing pins where possible)
## lock-upgrade: move every pin to the newest version the ranges allow
# requirements-dev.lock (product + dev tools) is resolved first; requirements.lock (the product
# only, what the Docker image installs) is constrained by it, so both pin the same versions.
LOCK := $(BIN)/uv pip compile pyproject.toml --quiet --generate-hashes --python-version 3.11 \
	--python-platform x86_64-unknown-linux-gnu --custom-compile-command 'make lock'

lock: setup
	$(LOCK) --extra dev -o requirements-dev.lock
	$(LOCK) -c requirements-dev.lock -o requirements.lock

lock-upgrade: setup
	$(LOCK) --extra dev --upgrade -o requirements-dev.lock
	$(LOCK) -c requirements-dev.lock --upgrade -o requirements.lock

## config-doc: rewrite README.md's configuration tables from the Settings (a unit test compares)
config-doc: setup
	$(BIN)/python -m streaminfer.config_doc README.md

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/lint-imports

typecheck: setup
	$(BIN)/mypy

pytest: setup
	$(BIN)/pytest

unit: setup
	$(BIN)/pytest tests/unit

integration: setup
	$(BIN)/pytest tests/integration

## test-cluster: the three-broker fault tests (starts KAFKA_NODES=3 on ports 19092-19094 unless
## running, stops it after; ~4 min, three more JVMs). Not part of `make test`.
test-cluster: setup
	$(BIN)/pytest -m cluster tests/cluster

format: setup
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

clean:
	rm -rf $(VENV) .run .pytest_cache .mypy_cache .ruff_cache

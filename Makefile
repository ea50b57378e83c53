# The README's commands. Everything runs from the virtualenv at .venv.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

MONITOR_VENV := .cache/monitor-venv

.PHONY: monitor-venv monitor-lock demo test tools up down status alerts setup lock lock-upgrade config-doc proto lint typecheck pytest unit integration test-cluster format clean

## demo: install, start Kafka + Redis + stages, send the digits held-out set, print a summary
demo: setup
	$(BIN)/streaminfer demo

## test: lint, type-check and run every test (starts Kafka and Redis if they are not running)
test: setup tools lint typecheck pytest

## tools: Debian's prometheus (promtool: the alert-rule tests and the dashboard test), when root
tools:
	@command -v promtool >/dev/null || { [ "$$(id -u)" = 0 ] \
	  && apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q prometheus >/dev/null; } \
	  || echo "tools: promtool missing (apt-get install prometheus as root); its tests will skip"

## up / down: start / stop the local stack in the background (idempotent)
## make up MONITORING=1: also a local Prometheus (Debian's package) scraping every worker
up: setup
	$(BIN)/streaminfer up --wait $(if $(MONITORING),--monitoring)

## alerts: promtool checks the Prometheus configs and rules and runs the alert unit tests
## (make test runs the same from tests/unit/ops/test_prometheus_rules.py)
alerts:
	promtool check config ops/prometheus/prometheus.yml
	promtool check rules ops/prometheus/alerts.yml ops/prometheus/monitor-rules.yml
	cd ops/prometheus && promtool test rules alerts_test.yml monitor-rules_test.yml

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

## proto: regenerate ingest/grpc_v2's Python modules from its .proto (grpcio-tools), then give
## them a descriptor pool of their own: Triton's, KServe's and MLServer's clients define the
## same `inference.*` messages, and two copies in the default pool refuse to load together
proto: setup
	$(BIN)/python -m grpc_tools.protoc -I . --python_out=. --pyi_out=. --grpc_python_out=. \
	  ingest/grpc_v2/grpc_predict_v2.proto
	sed -i 's/_descriptor_pool\.Default()\.AddSerializedFile/_descriptor_pool.DescriptorPool().AddSerializedFile/' \
	  ingest/grpc_v2/grpc_predict_v2_pb2.py
	grep -q 'DescriptorPool()' ingest/grpc_v2/grpc_predict_v2_pb2.py

## config-doc: rewrite README.md's configuration tables from the Settings (a unit test compares)
config-doc: setup
	$(BIN)/python -m streaminfer.config_doc README.md

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/lint-imports

typecheck: setup monitor-venv
	$(BIN)/mypy
	$(BIN)/mypy --python-executable $(MONITOR_VENV)/bin/python --strict \
	  --disable-error-code import-untyped monitor

# Two pytest processes: the tests that load grpc run in their own (see the `grpc` marker).
pytest: setup monitor-venv
	$(BIN)/pytest -m "not grpc"
	$(BIN)/pytest -m grpc

unit: setup
	$(BIN)/pytest tests/unit

integration: setup monitor-venv
	$(BIN)/pytest tests/integration

## monitor-venv: the faust-streaming monitor's own virtualenv (faust pins click<8.4; the
## product locks a newer click), from monitor/requirements.lock
monitor-venv: setup
	bash monitor/setup.sh $(MONITOR_VENV)

## monitor-lock: re-resolve monitor/requirements.lock after editing monitor/requirements.in
monitor-lock: setup
	$(BIN)/uv pip compile monitor/requirements.in --quiet --generate-hashes --python-version 3.11 \
	  --python-platform x86_64-unknown-linux-gnu --custom-compile-command 'make monitor-lock' \
	  -o monitor/requirements.lock

## test-cluster: the three-broker fault tests (starts KAFKA_NODES=3 on ports 19092-19094 unless
## running, stops it after; ~5-6 min, three more JVMs). Not part of `make test`.
test-cluster: setup
	$(BIN)/pytest -m cluster tests/cluster

format: setup
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

clean:
	rm -rf $(VENV) .run .pytest_cache .mypy_cache .ruff_cache

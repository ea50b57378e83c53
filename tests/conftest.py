# Real-service fixtures (Kafka, Redis, stage processes) for tests/integration and tests/faults;
# unit tests never request them, so they start nothing.
pytest_plugins = ["tests.fixtures"]

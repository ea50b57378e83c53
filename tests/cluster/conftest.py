"""Fixtures of the three-broker fault tests (``make test-cluster``; marker ``cluster``).

The session starts the local three-node cluster (``KAFKA_NODES=3 ops/kafka/kafka.sh start``,
ports 19092-19094, state in ``<home>/kafka-cluster/``) unless it is already running, points every
client and stage process at it with replication factor 3 (the brokers' default
``min.insync.replicas`` is 2), and stops it at the end if it started it. The one-node broker on
9092 is neither used nor touched. Redis is the usual one.

These tests are deselected unless the marker expression names ``cluster`` (``-m cluster``): three
more JVMs are too heavy for every ``make test``.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from streaminfer.settings import Settings
from streaminfer.stack import REDIS
from tests.cluster.cluster import ALL_RUNNING, ALL_STOPPED, LocalCluster


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if "cluster" in (config.getoption("markexpr") or ""):
        return
    dropped = [item for item in items if item.get_closest_marker("cluster")]
    if dropped:
        config.hook.pytest_deselected(items=dropped)
        items[:] = [item for item in items if not item.get_closest_marker("cluster")]


@pytest.fixture(scope="session")
def cluster() -> Iterator[LocalCluster]:
    local = LocalCluster(home=Settings().home)
    state = local.state()
    if state != ALL_RUNNING:
        local.start()  # also brings back a node a previous run left dead
    with pytest.MonkeyPatch.context() as env:
        # Through the environment: the stage subprocesses read their settings from it.
        env.setenv("KAFKA_BOOTSTRAP_SERVERS", local.bootstrap)
        env.setenv("STREAMINFER_KAFKA_TOPIC_REPLICATION_FACTOR", "3")
        yield local
    if state == ALL_STOPPED:
        local.stop()


@pytest.fixture(scope="session")
def services(cluster: LocalCluster) -> Iterator[None]:
    """Replaces tests.fixtures' ``services``: Kafka is the cluster; Redis as usual."""
    settings = Settings()
    started = REDIS.managed(settings) and not REDIS.running(settings)
    if started:
        REDIS.start(settings)
    yield
    if started:
        REDIS.stop(settings)

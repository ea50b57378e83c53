"""The local three-node Kafka cluster (ops/kafka/cluster.sh) as the cluster tests see it:
start, stop, kill -9 a node, and the facts about it the tests assert on (partition leaders,
ISRs, topic configs, the active controller)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from confluent_kafka.admin import AdminClient, PartitionMetadata

# The public names are not re-exported for mypy (no __all__ in confluent_kafka.admin).
from confluent_kafka.admin._config import ConfigResource
from confluent_kafka.admin._resource import ResourceType

from tests.helpers import REPO

SCRIPT = REPO / "ops" / "kafka" / "kafka.sh"
NODES = 3
INTERNAL_TOPICS = ("__consumer_offsets", "__transaction_state")

# kafka.sh status exit codes in cluster mode.
ALL_RUNNING, ALL_STOPPED = 0, 3


@dataclass(frozen=True)
class LocalCluster:
    """``KAFKA_NODES=3 ops/kafka/kafka.sh ...`` with state under ``home`` (Settings.home)."""

    home: Path

    def _env(self) -> dict[str, str]:
        return {
            **os.environ,
            "KAFKA_NODES": str(NODES),
            "STREAMINFER_HOME": str(self.home),
            "PYTHON": sys.executable,
        }

    def _run(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["bash", str(SCRIPT), *args],
            env=self._env(),
            capture_output=True,
            text=True,
            check=check,
        )

    def state(self) -> int:
        """0 every node running, 3 none, 4 some."""
        return self._run("status", check=False).returncode

    def start(self) -> None:
        """Start every node that is not running; returns once all answer and registered."""
        result = self._run("start", check=False)
        assert result.returncode == 0, f"cluster start failed:\n{result.stdout}\n{result.stderr}"

    def start_async(self) -> subprocess.Popen[str]:
        """:meth:`start` in the background (its output in ``stdout``, stderr merged)."""
        return subprocess.Popen(
            ["bash", str(SCRIPT), "start"],
            env=self._env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )

    def stop(self) -> None:
        self._run("stop")

    @property
    def bootstrap(self) -> str:
        return self._run("bootstrap").stdout.strip()

    def data_dir(self, node: int) -> Path:
        return self.home / "kafka-cluster" / f"node-{node}" / "data"

    def pid(self, node: int) -> int | None:
        result = self._run("pid", str(node), check=False)
        return int(result.stdout) if result.returncode == 0 else None

    def kill9(self, node: int) -> None:
        """SIGKILL node ``node``'s JVM (no controlled shutdown, no flush) and wait until gone."""
        pid = self.pid(node)
        assert pid is not None, f"node {node} is not running"
        os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 30
        while _alive(pid):
            assert time.monotonic() < deadline, f"node {node} (pid {pid}) survived SIGKILL"
            time.sleep(0.05)

    def active_controller(self) -> int:
        """The quorum leader: the KRaft election state each node persists
        (``__cluster_metadata-0/quorum-state``), highest epoch first.

        Not ``AdminClient.describe_cluster().controller``: in KRaft mode brokers answer that with
        a random live broker (clients cannot reach the controllers), and librdkafka has no
        DescribeMetadataQuorum."""
        best = (-1, -1)
        for node in range(1, NODES + 1):
            path = self.data_dir(node) / "__cluster_metadata-0" / "quorum-state"
            state = json.loads(path.read_text())
            best = max(best, (state.get("leaderEpoch", -1), state.get("leaderId", -1)))
        assert best[1] > 0, "no quorum leader recorded"
        return best[1]


def _alive(pid: int) -> bool:
    """Exists and is not a zombie (the JVM is reparented, someone else reaps it)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return False
    return "\nState:\tZ" not in status


def leaders(admin: AdminClient, topics: Iterable[str]) -> Counter[int]:
    """How many partitions of ``topics`` each broker leads."""
    metadata = admin.list_topics(timeout=10)
    return Counter(
        p.leader for t in topics for p in metadata.topics[t].partitions.values() if p.leader >= 0
    )


def _existing_partitions(
    admin: AdminClient, topics: Iterable[str]
) -> Iterator[tuple[str, PartitionMetadata]]:
    """Every partition of ``topics``; topics that do not exist yet (the internal ones before
    first use) have none."""
    metadata = admin.list_topics(timeout=10)
    for t in topics:
        if t in metadata.topics:
            yield from ((t, p) for p in metadata.topics[t].partitions.values())


def under_replicated(admin: AdminClient, topics: Iterable[str]) -> list[str]:
    """``topic-partition`` of every partition whose ISR is not all of its replicas, or that
    has no leader. Topics that do not exist yet (the internal ones before first use) count as
    fine."""
    return [
        f"{t}-{p.id} isr={p.isrs} replicas={p.replicas}"
        for t, p in _existing_partitions(admin, topics)
        if p.leader < 0 or sorted(p.isrs) != sorted(p.replicas)
    ]


def off_preferred(admin: AdminClient, topics: Iterable[str]) -> list[str]:
    """``topic-partition`` of every partition not led by its preferred (first) replica."""
    return [
        f"{t}-{p.id} leader={p.leader} replicas={p.replicas}"
        for t, p in _existing_partitions(admin, topics)
        if p.leader != p.replicas[0]
    ]


def topic_facts(admin: AdminClient, topic: str) -> tuple[int, str]:
    """(replication factor, effective min.insync.replicas) of ``topic``."""
    metadata = admin.list_topics(topic, timeout=10)
    replicas = {len(p.replicas) for p in metadata.topics[topic].partitions.values()}
    assert len(replicas) == 1, f"{topic}: partitions differ in replica count {replicas}"
    resource = ConfigResource(ResourceType.TOPIC, topic)
    config = admin.describe_configs([resource])[resource].result(timeout=10)
    return replicas.pop(), config["min.insync.replicas"].value

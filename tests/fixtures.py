"""Real Kafka and Redis for integration and fault tests.

Session-wide: uses ``KAFKA_BOOTSTRAP_SERVERS`` / ``REDIS_URL`` when set, otherwise starts the
local broker and Redis with the ``ops/`` scripts (and stops at the end what it started).
Per test: uuid-named topics (via the topic prefix) and groups, so tests never share state.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis
from confluent_kafka import Consumer, Message, TopicPartition

from streaminfer.kafka import create_topics, make_admin, make_consumer
from streaminfer.settings import Settings
from streaminfer.stack import KAFKA, REDIS, Service, group_ready
from streaminfer.wiring import StageName
from tests.helpers import REPO


def _ensure(service: Service, settings: Settings) -> bool:
    """Start ``service`` unless it is external or already up; True when started here."""
    if not service.managed(settings) or service.running(settings):
        return False
    service.start(settings)
    return True


@pytest.fixture(scope="session")
def services() -> Iterator[None]:
    settings = Settings()
    started = [s for s in (KAFKA, REDIS) if _ensure(s, settings)]
    yield
    for service in started:
        service.stop(settings)


@pytest.fixture()
def settings(services: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Settings:
    """Settings isolated to this test: its own topics, groups, Redis keys and run dir."""
    prefix = f"t{uuid.uuid4().hex[:10]}."
    # Through the environment, so that stage subprocesses started by the test see it too.
    monkeypatch.setenv("STREAMINFER_TOPIC_PREFIX", prefix)
    monkeypatch.setenv("STREAMINFER_RUN_DIR", str(tmp_path / "run"))
    settings = Settings()
    create_topics(settings)
    return settings


@pytest.fixture()
def redis_client(settings: Settings) -> redis.Redis:
    return redis.Redis.from_url(settings.redis.url.get_secret_value())


class StageProcesses:
    """``streaminfer stage NAME --workers N`` subprocesses, stopped with SIGTERM at the end."""

    def __init__(self, settings: Settings, log_dir: Path) -> None:
        self.settings = settings
        self.log_dir = log_dir
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.exit_codes: dict[str, list[int]] = {}

    def start(
        self,
        name: StageName,
        *,
        workers: int = 1,
        wait: bool = True,
        label: str | None = None,
        worker_id: str = "",
    ) -> None:
        """Start a member process of stage ``name``, known as ``label`` (default: ``name``).
        Processes of one stage that run side by side need distinct ``worker_id`` s."""
        label = label or name
        log = (self.log_dir / f"{label}.log").open("ab")
        env = {**os.environ, "STREAMINFER_WORKER_ID": worker_id}
        self.procs[label] = subprocess.Popen(
            [sys.executable, "-m", "streaminfer.cli", "stage", name, "--workers", str(workers)],
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=REPO,
            env=env,
        )
        if wait:
            self.wait_joined(name, label=label)

    def signal(self, label: str, signum: int) -> None:
        self.procs[label].send_signal(signum)

    def kill(self, label: str) -> int:
        """SIGKILL ``label`` and reap it."""
        self.procs[label].kill()
        return self.procs[label].wait(timeout=30)

    def terminate(self, label: str) -> int:
        """SIGTERM ``label`` (drain, commit, leave) and return its exit code."""
        self.procs[label].terminate()
        return self.procs[label].wait(timeout=60)

    def wait_joined(
        self, name: StageName, *, label: str | None = None, timeout_s: float = 60.0
    ) -> None:
        admin = make_admin(self.settings)
        proc = self.procs[label or name]
        log_file = self.log_dir / f"{label or name}.log"

        def joined() -> bool:
            if proc.poll() is not None:
                log = log_file.read_text()[-3000:]
                raise AssertionError(f"stage {name} exited with {proc.returncode}:\n{log}")
            return group_ready(admin, self.settings, name)

        wait_until(joined, timeout_s, f"stage {name} joined its group (log: {log_file})")

    def wait_members(self, name: StageName, count: int, timeout_s: float = 60.0) -> None:
        """Until stage ``name``'s group has ``count`` members, each owning a partition."""
        admin = make_admin(self.settings)
        group = self.settings.group_id(name)

        def ready() -> bool:
            description = admin.describe_consumer_groups([group])[group].result(timeout=10)
            owned = [len(m.assignment.topic_partitions) for m in description.members]
            return len(owned) == count and all(owned)

        wait_until(ready, timeout_s, f"{count} {name} members each own a partition")

    def stop_all(self) -> dict[str, int]:
        """SIGTERM every process still running; their exit codes (0 = drained cleanly)."""
        running = {label: p for label, p in self.procs.items() if p.poll() is None}
        for proc in running.values():
            proc.send_signal(signal.SIGTERM)
        return {label: proc.wait(timeout=60) for label, proc in running.items()}


@pytest.fixture()
def stages(settings: Settings, tmp_path: Path) -> Iterator[StageProcesses]:
    procs = StageProcesses(settings, tmp_path)
    yield procs
    codes = procs.stop_all()
    assert all(code == 0 for code in codes.values()), f"stages exited with {codes}"


def wait_until(condition: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s}s waiting until {what}")
        time.sleep(0.1)


def read_topic(
    settings: Settings, topic: str, *, count: int, timeout_s: float = 60.0
) -> list[Message]:
    """Every record of ``topic``: waits until at least ``count`` are in, then reads on to the
    partitions' current ends, so surplus records (duplicates) are returned too."""
    consumer: Consumer = make_consumer(settings, group_id=f"reader-{uuid.uuid4().hex}")
    partitions = consumer.list_topics(topic, timeout=10).topics[topic].partitions
    consumer.assign([TopicPartition(topic, p, 0) for p in partitions])
    messages: list[Message] = []

    def read_some() -> None:
        messages.extend(m for m in consumer.consume(1000, timeout=0.2) if not m.error())

    def at_end(ends: dict[int, int]) -> bool:
        positions = consumer.position([TopicPartition(topic, p) for p in partitions])
        return all(tp.offset >= ends[tp.partition] or ends[tp.partition] == 0 for tp in positions)

    try:
        deadline = time.monotonic() + timeout_s
        while len(messages) < count and time.monotonic() < deadline:
            read_some()
        # The ends are read once: asking the broker on every loop would queue behind fetches.
        ends = {
            p: consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=10)[1]
            for p in partitions
        }
        while not at_end(ends) and time.monotonic() < deadline:
            read_some()
    finally:
        consumer.close()
    if len(messages) < count:
        raise AssertionError(f"{topic}: {len(messages)} records after {timeout_s}s, want {count}")
    return messages

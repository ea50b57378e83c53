"""Real Kafka and Redis for integration tests.

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

pytestmark = pytest.mark.integration


def _ensure(service: Service, settings: Settings) -> bool:
    """Start ``service`` unless it is external or already up; True when started here."""
    if not service.managed() or service.running(settings):
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
def settings(services: None, tmp_path: Path) -> Settings:
    """Settings isolated to this test: its own topics, groups, Redis keys and run dir."""
    prefix = f"t{uuid.uuid4().hex[:10]}."
    env = {"STREAMINFER_TOPIC_PREFIX": prefix, "STREAMINFER_RUN_DIR": str(tmp_path / "run")}
    os.environ.update(env)  # for subprocesses started by the test
    settings = Settings()
    create_topics(settings)
    return settings


@pytest.fixture()
def redis_client(settings: Settings) -> redis.Redis:
    return redis.Redis.from_url(settings.redis_url.get_secret_value())


class StageProcesses:
    """``streaminfer stage NAME --workers N`` subprocesses, stopped with SIGTERM at the end."""

    def __init__(self, settings: Settings, log_dir: Path) -> None:
        self.settings = settings
        self.log_dir = log_dir
        self.procs: dict[str, subprocess.Popen[bytes]] = {}

    def start(self, name: StageName, *, workers: int = 1, wait: bool = True) -> None:
        log = (self.log_dir / f"{name}.log").open("ab")
        self.procs[name] = subprocess.Popen(
            [sys.executable, "-m", "streaminfer.cli", "stage", name, "--workers", str(workers)],
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=REPO,
            env=os.environ.copy(),
        )
        if wait:
            self.wait_joined(name)

    def wait_joined(self, name: StageName, timeout_s: float = 60.0) -> None:
        admin = make_admin(self.settings)
        proc = self.procs[name]

        def joined() -> bool:
            if proc.poll() is not None:
                log = (self.log_dir / f"{name}.log").read_text()[-3000:]
                raise AssertionError(f"stage {name} exited with {proc.returncode}:\n{log}")
            return group_ready(admin, self.settings, name)

        wait_until(
            joined,
            timeout_s,
            f"stage {name} joined its group (log: {self.log_dir / name}.log)",
        )

    def stop_all(self) -> dict[str, int]:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        return {name: proc.wait(timeout=60) for name, proc in self.procs.items()}


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

    def at_end() -> bool:
        ends = {
            p: consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=10)[1]
            for p in partitions
        }
        positions = consumer.position([TopicPartition(topic, p) for p in partitions])
        return all(tp.offset >= ends[tp.partition] or ends[tp.partition] == 0 for tp in positions)

    try:
        deadline = time.monotonic() + timeout_s
        while len(messages) < count and time.monotonic() < deadline:
            read_some()
        while not at_end() and time.monotonic() < deadline:
            read_some()
    finally:
        consumer.close()
    if len(messages) < count:
        raise AssertionError(f"{topic}: {len(messages)} records after {timeout_s}s, want {count}")
    return messages

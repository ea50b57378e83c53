"""Real Kafka and Redis for integration and fault tests.

Session-wide: uses ``KAFKA_BOOTSTRAP_SERVERS`` / ``REDIS_URL`` when set, otherwise starts the
local broker and Redis with the ``ops/`` scripts (and stops at the end what it started).
Per test: uuid-named topics (via the topic prefix) and groups, so tests never share state.

The one way tests start the pipeline is :meth:`StageProcesses.start_pipeline` (real
``streaminfer stage`` processes); :class:`Load` sends paced traffic from a thread.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis
from confluent_kafka import Consumer, Message, TopicPartition

from kafkaio.offsets import end_offsets, end_offsets_total, partitions
from kafkaio.produce import RequestProducer
from streaminfer.kafka import create_topics, make_admin, make_consumer, make_producer
from streaminfer.settings import Settings
from streaminfer.stack import KAFKA, REDIS, Service, group_ready
from streaminfer.wiring import STAGE_NAMES, StageName
from tests.helpers import REPO, digits_request, holdout


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

    def start_pipeline(self) -> None:
        """validate, infer and persist, one member each, every one joined to its group."""
        for name in STAGE_NAMES:
            self.start(name)

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
    numbers = partitions(consumer, topic)
    consumer.assign([TopicPartition(topic, p, 0) for p in numbers])
    messages: list[Message] = []

    def read_some() -> None:
        messages.extend(m for m in consumer.consume(1000, timeout=0.2) if not m.error())

    def at_end(ends: dict[int, int]) -> bool:
        positions = consumer.position([TopicPartition(topic, p) for p in numbers])
        return all(tp.offset >= ends[tp.partition] or ends[tp.partition] == 0 for tp in positions)

    try:
        deadline = time.monotonic() + timeout_s
        while len(messages) < count and time.monotonic() < deadline:
            read_some()
        # The ends are read once: asking the broker on every loop would queue behind fetches.
        ends = end_offsets(consumer, topic)
        while not at_end(ends) and time.monotonic() < deadline:
            read_some()
    finally:
        consumer.close()
    if len(messages) < count:
        raise AssertionError(f"{topic}: {len(messages)} records after {timeout_s}s, want {count}")
    return messages


def records_written(settings: Settings, topic: str) -> int:
    """The sum of ``topic``'s end offsets (0: nothing was ever written to it)."""
    consumer = make_consumer(settings, group_id=f"offsets-{uuid.uuid4().hex}")
    try:
        return end_offsets_total(consumer, topic)
    finally:
        consumer.close()


class Load:
    """Sends ``count`` digits requests at ``rate`` per second from a background thread."""

    def __init__(self, settings: Settings, *, count: int, rate: float, tag: str = "f") -> None:
        self.settings = settings
        self.ids = [f"{tag}-{i}" for i in range(count)]
        self.rate = rate
        self.sent = 0
        self.undelivered = -1
        self._sender: RequestProducer | None = None
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> Load:
        self._thread.start()
        return self

    def _run(self) -> None:
        features, _ = holdout()
        # Like a client that retries: outlive a broker restart instead of failing the send.
        producer = make_producer(self.settings, **{"delivery.timeout.ms": 180_000})
        sender = RequestProducer(producer=producer, topic=self.settings.topics.requests)
        self._sender = sender
        started = time.monotonic()
        for i, request_id in enumerate(self.ids):
            # Pace against the clock, not with fixed sleeps, so the rate holds under load.
            ahead = started + i / self.rate - time.monotonic()
            if self._stopped.wait(max(0.0, ahead)):
                break
            sender.send(digits_request(features[i % len(features)], request_id=request_id))
            self.sent = i + 1
        self.undelivered = sender.flush(200)

    def stop(self) -> None:
        """Send no more (of ``ids``, only the first ``sent`` went out)."""
        self._stopped.set()

    def wait_sent(self, fraction: float, timeout_s: float = 60) -> None:
        target = int(len(self.ids) * fraction)
        wait_until(lambda: self.sent >= target, timeout_s, f"{target} requests sent")

    def join(self, timeout_s: float = 240) -> None:
        self._thread.join(timeout_s)
        assert not self._thread.is_alive(), "load did not finish"
        failed = self._sender.failed[:1] if self._sender else []
        assert self.undelivered == 0, f"{self.undelivered} requests not acknowledged: {failed}"

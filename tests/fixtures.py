"""Real Kafka and Redis for integration and fault tests.

Session-wide, each service from one of three backends (:func:`choose_backend`):
``external`` when ``KAFKA_BOOTSTRAP_SERVERS`` / ``REDIS_URL`` is set (used as is);
``testcontainers`` when a Docker engine answers (the apache/kafka KRaft image and redis,
removed at the end); ``local`` otherwise: the local broker and Redis of the ``ops/`` scripts
(reused when already up; what the fixture started it stops at the end).
``STREAMINFER_TEST_BACKEND=local|testcontainers|external`` overrides the choice.
Per test: uuid-named topics (via the topic prefix) and groups, so tests never share state.

The one way tests start the pipeline is :meth:`StageProcesses.start_pipeline` (real
``streaminfer stage`` processes of the topology ``STREAMINFER_STAGE_TOPOLOGY`` names: validate,
infer and persist, or fused); :class:`Load` sends paced traffic from a thread.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager
from functools import cache
from pathlib import Path
from typing import Final, Literal, get_args

import pytest
import redis
from confluent_kafka import Consumer, Message, TopicPartition

from kafkaio.offsets import end_offsets, end_offsets_total, partitions
from kafkaio.produce import RequestProducer
from streaminfer.kafka import create_topics, make_admin, make_consumer, make_producer
from streaminfer.settings import Settings
from streaminfer.stack import KAFKA, REDIS, Service, group_ready
from streaminfer.wiring import STAGE_NAMES, StageName, topology_stages
from tests.helpers import REPO, digits_request, holdout


def _ensure(service: Service, settings: Settings) -> bool:
    """Start ``service`` unless it is external or already up; True when started here."""
    if not service.managed(settings) or service.running(settings):
        return False
    service.start(settings)
    return True


Backend = Literal["local", "testcontainers", "external"]
BACKEND_VARIABLE: Final = "STREAMINFER_TEST_BACKEND"
# Images of docker-compose.yml: the same broker and Redis as a Docker user's stack.
KAFKA_IMAGE: Final = "apache/kafka:4.1.1"
REDIS_IMAGE: Final = "redis:7"
# Each service, and the variable that points the settings at an existing one.
SERVICE_VARIABLES: Final = ((KAFKA, "KAFKA_BOOTSTRAP_SERVERS"), (REDIS, "REDIS_URL"))


def choose_backend(
    environ: Mapping[str, str], variable: str, docker_answers: Callable[[], bool]
) -> Backend:
    """Where the tests get the service that ``variable`` (``KAFKA_BOOTSTRAP_SERVERS`` or
    ``REDIS_URL``) points at: ``STREAMINFER_TEST_BACKEND`` when set; else ``external`` when
    ``variable`` is set; else ``testcontainers`` when a Docker engine answers; else ``local``.
    ``docker_answers`` is only asked when it decides."""
    asked = environ.get(BACKEND_VARIABLE, "").strip().lower()
    if asked:
        forced = {b: b for b in get_args(Backend)}.get(asked)
        if forced is None:
            choices = ", ".join(get_args(Backend))
            raise pytest.UsageError(f"{BACKEND_VARIABLE}={asked!r}: use one of {choices}")
        if forced == "external" and not environ.get(variable):
            raise pytest.UsageError(f"{BACKEND_VARIABLE}=external needs {variable}")
        return forced
    if environ.get(variable):
        return "external"
    return "testcontainers" if docker_answers() else "local"


@cache
def docker_answers(timeout_s: float = 2.0) -> bool:
    """Whether a Docker engine answers a ping (``DOCKER_HOST`` or the local socket)."""
    try:
        import docker
    except ImportError:
        return False
    try:
        client = docker.from_env(timeout=int(max(1, timeout_s)))
        try:
            return bool(client.ping())
        finally:
            client.close()
    except Exception:  # no socket, no permission, no engine: no Docker
        return False


def kafka_environment(host_port: int) -> dict[str, str]:
    """The apache/kafka image's settings for one KRaft node that clients on this host reach
    at ``127.0.0.1:host_port`` (the container's 9092 is bound to that same port, so the
    advertised address is right inside and out)."""
    return {
        "KAFKA_NODE_ID": "1",
        "KAFKA_PROCESS_ROLES": "broker,controller",
        "KAFKA_LISTENERS": "PLAINTEXT://:9092,CONTROLLER://:9093",
        "KAFKA_ADVERTISED_LISTENERS": f"PLAINTEXT://127.0.0.1:{host_port}",
        "KAFKA_LISTENER_SECURITY_PROTOCOL_MAP": "PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT",
        "KAFKA_CONTROLLER_LISTENER_NAMES": "CONTROLLER",
        "KAFKA_CONTROLLER_QUORUM_VOTERS": "1@localhost:9093",
        "KAFKA_OFFSETS_TOPIC_REPLICATION_FACTOR": "1",
        "KAFKA_TRANSACTION_STATE_LOG_REPLICATION_FACTOR": "1",
        "KAFKA_TRANSACTION_STATE_LOG_MIN_ISR": "1",
        "KAFKA_SHARE_COORDINATOR_STATE_TOPIC_REPLICATION_FACTOR": "1",
        "KAFKA_SHARE_COORDINATOR_STATE_TOPIC_MIN_ISR": "1",
        "KAFKA_GROUP_INITIAL_REBALANCE_DELAY_MS": "0",
        "KAFKA_AUTO_CREATE_TOPICS_ENABLE": "false",
    }


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@contextmanager
def _container(service: Service) -> Iterator[str]:
    """Run ``service`` in a container for the session; yields the address settings take."""
    from testcontainers.core.container import DockerContainer
    from testcontainers.core.wait_strategies import LogMessageWaitStrategy

    if service is KAFKA:
        port = _free_port()
        container = DockerContainer(KAFKA_IMAGE).with_bind_ports(9092, port)
        for name, value in kafka_environment(port).items():
            container.with_env(name, value)
        container.waiting_for(LogMessageWaitStrategy("Kafka Server started"))
        address = f"127.0.0.1:{port}"
    else:
        from testcontainers.community.redis import RedisContainer

        container = RedisContainer(REDIS_IMAGE)
        address = ""
    with container:
        if service is not KAFKA:
            host, port = container.get_container_host_ip(), container.get_exposed_port(6379)
            address = f"redis://{host}:{port}/0"
        yield address


@pytest.fixture(scope="session")
def services() -> Iterator[None]:
    with pytest.MonkeyPatch.context() as env, ExitStack() as containers:
        for service, variable in SERVICE_VARIABLES:
            backend = choose_backend(os.environ, variable, docker_answers)
            if backend == "testcontainers":
                # Through the environment, so stage subprocesses reach the container too.
                env.setenv(variable, containers.enter_context(_container(service)))
            elif backend == "local":
                env.delenv(variable, raising=False)
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
        self.pipeline: tuple[StageName, ...] = STAGE_NAMES  # what start_pipeline started

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
        """The stages of the topology the environment names (read now, as the stage
        processes will: validate, infer and persist, or fused), one member each, every one
        joined to its group."""
        self.pipeline = topology_stages(Settings())
        for name in self.pipeline:
            self.start(name)

    def runs(self, step: StageName) -> StageName:
        """The stage whose process runs ``step`` in the pipeline started: ``step`` itself
        (split) or ``fused``; what a test kills to kill ``step``."""
        return step if step in self.pipeline else "fused"

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


def send_digits(settings: Settings, topic: str, ids: Sequence[str]) -> None:
    """One digits request per id (the held-out rows in turn) to ``topic``; returns once Kafka
    acknowledged every one."""
    features, _ = holdout()
    sender = RequestProducer(producer=make_producer(settings), topic=topic)
    for i, request_id in enumerate(ids):
        sender.send(digits_request(features[i % len(features)], request_id=request_id))
    assert sender.flush() == 0


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

"""The local stack: Kafka and Redis (via ``ops/`` scripts), topics, and the stages of the
configured topology (validate, infer and persist; or ``fused`` alone, see
:func:`streaminfer.wiring.topology_stages`).

``up`` is idempotent: it starts whatever is not running and leaves the rest alone. Kafka is
not started when ``KAFKA_BOOTSTRAP_SERVERS`` is set, nor Redis when ``REDIS_URL`` is: those
point at servers someone else runs. Stage processes run detached; their pid files and logs
live in ``settings.run_dir``.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from confluent_kafka import ConsumerGroupState
from confluent_kafka.admin import AdminClient

from streaminfer import monitoring as monitor
from streaminfer.kafka import create_topics, make_admin
from streaminfer.settings import REPO_ROOT, Settings
from streaminfer.wiring import ALL_STAGE_NAMES, StageName, input_topics, topology_stages

OPS = REPO_ROOT / "ops"
INGEST = "ingest"  # the HTTP API process, managed like a stage (pid file and log in run_dir)
PROMETHEUS = "prometheus"  # `up --monitoring` (streaminfer/monitoring.py)


@dataclass(frozen=True, slots=True)
class Service:
    """An external service started by an ops script (``start``/``stop``/``status``)."""

    name: str
    script: Path

    def managed(self, settings: Settings) -> bool:
        """False when the user points us at a server of their own (environment or .env)."""
        return not (settings.kafka.external if self.name == "kafka" else settings.redis.external)

    def address(self, settings: Settings) -> str:
        if self.name == "kafka":
            return settings.kafka.bootstrap_servers
        return settings.redis.url.get_secret_value()

    def running(self, settings: Settings) -> bool:
        result = subprocess.run(
            ["bash", str(self.script), "status"], env=_ops_env(settings), capture_output=True
        )
        return result.returncode == 0

    def start(self, settings: Settings) -> None:
        subprocess.run(["bash", str(self.script), "start"], env=_ops_env(settings), check=True)

    def stop(self, settings: Settings) -> None:
        subprocess.run(["bash", str(self.script), "stop"], env=_ops_env(settings), check=True)


KAFKA = Service("kafka", OPS / "kafka" / "kafka.sh")
REDIS = Service("redis", OPS / "redis" / "redis.sh")
SERVICES = (KAFKA, REDIS)


class TopologyConflict(RuntimeError):
    """Stages of another topology are running: both would process every request."""


def _ops_env(settings: Settings) -> dict[str, str]:
    # The scripts read their ports from the environment: pass what Settings read (a .env too).
    return {
        **os.environ,
        "STREAMINFER_HOME": str(settings.home),
        "STREAMINFER_KAFKA_PORT": str(settings.kafka.port),
        "KAFKA_NODES": str(settings.kafka.nodes),
        "STREAMINFER_KAFKA_CLUSTER_PORT": str(settings.kafka.cluster_port),
        "STREAMINFER_REDIS_PORT": str(settings.redis.port),
        "PYTHON": sys.executable,
    }


def up(
    settings: Settings,
    *,
    workers: int = 1,
    monitoring: bool = False,
    prometheus_port: int = monitor.PROMETHEUS_PORT,
    echo: Callable[[str], None] = print,
) -> list[str]:
    """Start whatever is not running; returns the names of what this call started. With
    ``monitoring``, every stage serves metrics on ports of its own, is listed as a scrape
    target, and a local Prometheus scrapes them (streaminfer/monitoring.py)."""
    check_topology(settings)  # before anything starts
    started: list[str] = []
    for service in SERVICES:
        if not service.managed(settings):
            echo(f"{service.name}: using {service.address(settings)} (not started here)")
        elif not service.running(settings):
            service.start(settings)
            started.append(service.name)
        else:
            echo(f"{service.name}: already running")
    for topic, outcome in create_topics(settings).items():
        if outcome == "created":
            echo(f"topic {topic}: created")
    for name in topology_stages(settings):
        if _stage_pid(settings, name) is None:
            _spawn_stage(settings, name, workers, monitoring=monitoring)
            started.append(name)
            echo(f"stage {name}: started (log {_log_file(settings, name)})")
        else:
            echo(f"stage {name}: already running")
    if _stage_pid(settings, INGEST) is None:
        _spawn(settings, INGEST, ["ingest", "--port", str(settings.ingest.port)])
        started.append(INGEST)
        url = f"http://{settings.ingest.host}:{settings.ingest.port}"
        echo(f"ingest: {url} (log {_log_file(settings, INGEST)})")
    else:
        echo("ingest: already running")
    if monitoring:
        monitor.announce_ingest(settings)
        monitor.start(settings, port=prometheus_port, echo=echo)
        started.append("prometheus")
    return started


def check_topology(settings: Settings) -> None:
    """Raise :class:`TopologyConflict` when a stage outside the configured topology runs
    (the topology was switched without a ``down``): validate and fused both consume
    ``inference.requests``, each in its own group, so every request would be served twice."""
    wanted = topology_stages(settings)
    stray = [n for n in ALL_STAGE_NAMES if n not in wanted and _stage_pid(settings, n)]
    if stray:
        raise TopologyConflict(
            f"stage {', '.join(stray)} running, but the topology is {settings.stage.topology} "
            f"({', '.join(wanted)}): run `streaminfer down` first"
        )


def down(
    settings: Settings,
    *,
    only: Iterable[str] | None = None,
    echo: Callable[[str], None] = print,
) -> None:
    """Stop the ingest API, the stages (drain first), Prometheus, then Redis and Kafka;
    ``only`` limits what is stopped."""
    every = {INGEST, *ALL_STAGE_NAMES, PROMETHEUS, *(s.name for s in SERVICES)}
    wanted = set(only) if only is not None else every
    if INGEST in wanted:
        _stop_stage(settings, INGEST, echo)
    for name in ALL_STAGE_NAMES:  # whatever runs, whichever the topology
        if name in wanted:
            _stop_stage(settings, name, echo)
    if PROMETHEUS in wanted and monitor.local_prometheus(settings).stop():
        echo("prometheus: stopped")
    for service in reversed(SERVICES):
        if service.name in wanted and service.managed(settings):
            service.stop(settings)


def wait_for_stages(settings: Settings, *, timeout_s: float = 60.0) -> None:
    """Block until every stage's group is stable with all input partitions assigned."""
    admin = make_admin(settings)
    deadline = time.monotonic() + timeout_s
    pending: list[StageName] = list(topology_stages(settings))
    while pending:
        name = pending[0]
        if group_ready(admin, settings, name):
            pending.pop(0)
            continue
        if time.monotonic() > deadline:
            log = _log_file(settings, name)
            raise TimeoutError(f"stage {name} did not join its group in {timeout_s}s; see {log}")
        time.sleep(0.2)


def group_ready(admin: AdminClient, settings: Settings, name: StageName) -> bool:
    group = settings.group_id(name)
    try:
        description = admin.describe_consumer_groups([group])[group].result(timeout=10)
    except Exception:
        return False
    if description.state != ConsumerGroupState.STABLE:
        return False
    assigned = sum(len(m.assignment.topic_partitions) for m in description.members)
    metadata = admin.list_topics(timeout=10)
    expected = sum(
        len(metadata.topics[t].partitions)
        for t in input_topics(settings, name)
        if t in metadata.topics
    )
    return assigned >= expected > 0


def _pid_file(settings: Settings, name: str) -> Path:
    return settings.run_dir / f"{name}.pid"


def _log_file(settings: Settings, name: str) -> Path:
    return settings.run_dir / f"{name}.log"


def _stage_pid(settings: Settings, name: str) -> int | None:
    """The pid of the running stage supervisor, or None (stale pid files are removed)."""
    path = _pid_file(settings, name)
    try:
        pid = int(path.read_text().strip())
        os.kill(pid, 0)
    except (FileNotFoundError, ValueError, ProcessLookupError):
        path.unlink(missing_ok=True)
        return None
    return pid


def _spawn_stage(settings: Settings, name: str, workers: int, *, monitoring: bool) -> None:
    # --supervise: the stage's own supervisor restarts a worker that exits (crash, exit 75)
    command = ["stage", name, "--workers", str(workers), "--supervise"]
    if not monitoring:
        _spawn(settings, name, command)
        return
    _spawn(settings, name, command, env=monitor.stage_env(settings, name))
    monitor.announce_stage(settings, name, workers)


def _spawn(
    settings: Settings, name: str, command: list[str], env: dict[str, str] | None = None
) -> None:
    """``streaminfer COMMAND...`` detached, with its pid file and log named ``name``."""
    settings.run_dir.mkdir(parents=True, exist_ok=True)
    with _log_file(settings, name).open("ab") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "streaminfer.cli", *command],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,  # survives the terminal that ran `up`
            cwd=REPO_ROOT,
            env=env,
        )
    _pid_file(settings, name).write_text(f"{proc.pid}\n")


def _stop_stage(settings: Settings, name: str, echo: Callable[[str], None]) -> None:
    pid = _stage_pid(settings, name)
    if pid is None:
        return
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            break
        _reap(pid)
        time.sleep(0.1)
    else:
        os.killpg(pid, signal.SIGKILL)
        echo(f"stage {name}: did not drain in 30s, killed")
    _pid_file(settings, name).unlink(missing_ok=True)
    monitor.withdraw(settings, name)  # no longer a scrape target
    echo(f"stage {name}: stopped")


def _reap(pid: int) -> None:
    """Collect our own child's exit status so it does not linger as a zombie."""
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)


def status(settings: Settings) -> list[str]:
    """One line per component: running or stopped (the topology's stages, and any other
    stage that runs)."""
    lines = []
    for service in SERVICES:
        if not service.managed(settings):
            lines.append(f"{service.name}: external ({service.address(settings)})")
        else:
            state = "running" if service.running(settings) else "stopped"
            lines.append(f"{service.name}: {state}")
    wanted = topology_stages(settings)
    for name in ALL_STAGE_NAMES:
        pid = _stage_pid(settings, name)
        if name not in wanted and pid is None:
            continue
        lines.append(f"stage {name}: " + (f"running (pid {pid})" if pid else "stopped"))
    pid = _stage_pid(settings, INGEST)
    lines.append(
        "ingest: " + (f"running (pid {pid}, port {settings.ingest.port})" if pid else "stopped")
    )
    prometheus = monitor.local_prometheus(settings)
    if prometheus.pid() is not None:
        lines.append(f"prometheus: running ({prometheus.url})")
    return lines

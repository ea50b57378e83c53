"""Monitoring for the local stack: a Prometheus from Debian's package, the scrape targets it
discovers from files, and the stage supervisor's own metrics.

``streaminfer up --monitoring`` (see :func:`start`):

- every stage runs supervised with its metrics on ports of its own: stage ``validate`` /
  ``infer`` / ``persist`` serve worker slot K on ``base + 100 * i + K`` (``base`` is
  ``STREAMINFER_STAGE_METRICS_PORT``, default 9400) and the supervisor on ``... + 99``;
- the stack writes one file-based service discovery file (``file_sd``, JSON) per stage and one
  for ingest under ``<run_dir>/prometheus/targets/`` when it starts them and removes it when it
  stops them; Prometheus re-reads them on change. A target listed but not answering is
  ``up == 0``: that is how an alert learns a stage has no live worker;
- Prometheus (installed with ``apt-get install prometheus`` when missing and we are root)
  listens on 127.0.0.1:9190 (not 9090: on a systemd host the Debian package starts a
  Prometheus of its own there), keeps its data in ``<home>/prometheus`` and loads the alert
  rules of ``ops/prometheus/alerts.yml``.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import shutil
import signal
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from prometheus_client import CollectorRegistry, multiprocess, start_http_server

from stages.committers import EXIT_STUCK
from stages.metrics import WORKER_EXITS, counter
from streaminfer.settings import REPO_ROOT, Settings

PROMETHEUS_PORT = 9190
DEFAULT_METRICS_BASE = 9400
STAGE_PORT_STRIDE = 100  # ports per stage: worker slots 0..98, the supervisor on 99
SUPERVISOR_OFFSET = 99
STAGES = ("validate", "infer", "persist", "fused")  # the order fixes each stage's port range
RULES = REPO_ROOT / "ops" / "prometheus" / "alerts.yml"
MONITOR_RULES = REPO_ROOT / "ops" / "prometheus" / "monitor-rules.yml"  # drift
MONITOR_TARGET = "127.0.0.1:9390"  # `streaminfer monitor`'s default /metrics
# The scrape jobs; ops/prometheus/alerts.yml and ops/grafana/streaminfer.json use these names.
JOB_STAGE = "streaminfer-stage"
JOB_SUPERVISOR = "streaminfer-supervisor"
JOB_INGEST = "streaminfer-ingest"
JOB_MONITOR = "streaminfer-monitor"


# --- ports and targets ------------------------------------------------------------------


def stage_metrics_base(settings: Settings, stage: str) -> int:
    """Slot 0's metrics port of ``stage`` when the stack runs it."""
    base = settings.stage.metrics_port or DEFAULT_METRICS_BASE
    return base + STAGES.index(stage) * STAGE_PORT_STRIDE


def stage_env(settings: Settings, stage: str) -> dict[str, str]:
    """The environment of a stage the stack starts with monitoring."""
    return {
        **os.environ,
        "STREAMINFER_STAGE_METRICS_PORT": str(stage_metrics_base(settings, stage)),
    }


@dataclass(frozen=True, slots=True)
class TargetGroup:
    """One ``file_sd`` entry: addresses and the labels Prometheus attaches to them."""

    targets: tuple[str, ...]
    labels: Mapping[str, str]

    def as_json(self) -> dict[str, Any]:
        return {"targets": list(self.targets), "labels": dict(self.labels)}


def stage_targets(stage: str, *, base_port: int, workers: int, host: str) -> list[TargetGroup]:
    """Each worker slot of ``stage`` (label ``worker``), and its supervisor."""
    groups = [
        TargetGroup((f"{host}:{base_port + slot}",), {"stage": stage, "worker": str(slot)})
        for slot in range(workers)
    ]
    supervisor = (f"{host}:{base_port + SUPERVISOR_OFFSET}",)
    groups.append(TargetGroup(supervisor, {"stage": stage, "worker": "supervisor"}))
    return groups


class TargetFiles:
    """The ``file_sd`` directory: ``<job>-<name>.json`` files, each written whole (temporary
    file + rename, so Prometheus never reads half a file)."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    def path(self, job: str, name: str) -> Path:
        return self.directory / f"{job}-{name}.json"

    def write(self, job: str, name: str, groups: Sequence[TargetGroup]) -> Path:
        self.directory.mkdir(parents=True, exist_ok=True)
        path = self.path(job, name)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps([g.as_json() for g in groups], indent=1))
        tmp.replace(path)
        return path

    def remove(self, job: str, name: str) -> None:
        self.path(job, name).unlink(missing_ok=True)

    def write_stage(self, stage: str, *, base_port: int, workers: int, host: str) -> None:
        """Workers under job ``streaminfer-stage``, the supervisor under its own job (so
        ``up{job="streaminfer-stage"}`` counts workers only)."""
        groups = stage_targets(stage, base_port=base_port, workers=workers, host=host)
        self.write(JOB_STAGE, stage, groups[:-1])
        self.write(JOB_SUPERVISOR, stage, groups[-1:])

    def remove_stage(self, stage: str) -> None:
        self.remove(JOB_STAGE, stage)
        self.remove(JOB_SUPERVISOR, stage)


def target_files(settings: Settings) -> TargetFiles:
    return TargetFiles(settings.run_dir / "prometheus" / "targets")


# --- the Prometheus configuration ------------------------------------------------------------


def prometheus_config(
    *,
    targets_dir: Path,
    rule_files: Sequence[Path] = (RULES, MONITOR_RULES),
    scrape_interval_s: float = 5.0,
) -> str:
    """A Prometheus configuration scraping every job from the ``file_sd`` files."""

    def job(name: str) -> dict[str, Any]:
        files = [str(targets_dir / f"{name}-*.json")]
        return {
            "job_name": name,
            "file_sd_configs": [{"files": files, "refresh_interval": "5s"}],
        }

    interval = f"{int(scrape_interval_s * 1000)}ms"
    config = {
        "global": {"scrape_interval": interval, "evaluation_interval": interval},
        "rule_files": [str(p) for p in rule_files],
        "scrape_configs": [
            job(JOB_STAGE),
            job(JOB_SUPERVISOR),
            job(JOB_INGEST),
            # the monitor, when `streaminfer monitor` runs (down otherwise: no alert on it)
            {"job_name": JOB_MONITOR, "static_configs": [{"targets": [MONITOR_TARGET]}]},
        ],
    }
    return yaml.safe_dump(config, sort_keys=False)


# --- the Prometheus process ------------------------------------------------------------------


class PrometheusMissing(RuntimeError):
    """No ``prometheus`` binary, and we may not install it."""


def ensure_installed(echo: Callable[[str], None] = print) -> str:
    """The path of ``prometheus``; installs Debian's package first when it is missing and
    we are root (as ops/kafka and ops/redis do for Java and redis-server)."""
    found = shutil.which("prometheus")
    if found:
        return found
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        raise PrometheusMissing(
            "prometheus is not installed: run `apt-get install prometheus` as root "
            "(Debian's package), or put a prometheus binary on PATH"
        )
    echo("prometheus: installing Debian's package")
    subprocess.run(["apt-get", "update", "-q"], check=True)
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    subprocess.run(["apt-get", "install", "-y", "-q", "prometheus"], check=True, env=env)
    found = shutil.which("prometheus")
    if not found:
        raise PrometheusMissing("apt-get installed prometheus but it is not on PATH")
    return found


@dataclass(frozen=True, slots=True)
class LocalPrometheus:
    """One Prometheus process on 127.0.0.1:``port`` with its files in ``directory`` (config,
    pid file, log) and its time series in ``data_dir``."""

    port: int
    directory: Path
    data_dir: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def config_file(self) -> Path:
        return self.directory / "prometheus.yml"

    @property
    def pid_file(self) -> Path:
        return self.directory / "prometheus.pid"

    @property
    def log_file(self) -> Path:
        return self.directory / "prometheus.log"

    def pid(self) -> int | None:
        try:
            pid = int(self.pid_file.read_text().strip())
            os.kill(pid, 0)
        except (FileNotFoundError, ValueError, ProcessLookupError):
            return None
        return pid

    def start(self, config: str, *, binary: str = "prometheus") -> int:
        """Write ``config`` and start Prometheus detached (unless running); returns its pid."""
        self.directory.mkdir(parents=True, exist_ok=True)
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.config_file.write_text(config)
        running = self.pid()
        if running is not None:
            self.reload()
            return running
        argv = [
            binary,
            f"--config.file={self.config_file}",
            f"--storage.tsdb.path={self.data_dir}",
            f"--web.listen-address=127.0.0.1:{self.port}",
            "--web.enable-lifecycle",  # POST /-/reload after a config change
            "--storage.tsdb.retention.time=7d",
        ]
        with self.log_file.open("ab") as log:
            proc = subprocess.Popen(
                argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                start_new_session=True,
            )  # fmt: skip
        self.pid_file.write_text(f"{proc.pid}\n")
        return proc.pid

    def reload(self) -> None:
        request = urllib.request.Request(f"{self.url}/-/reload", method="POST")
        with contextlib.suppress(urllib.error.URLError, OSError):
            urllib.request.urlopen(request, timeout=5).close()

    def wait_ready(self, timeout_s: float = 60.0) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(f"{self.url}/-/ready", timeout=2) as response:
                    if response.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                pass
            if self.pid() is None:
                raise RuntimeError(f"prometheus exited; see {self.log_file}")
            time.sleep(0.2)
        raise TimeoutError(f"prometheus not ready in {timeout_s}s; see {self.log_file}")

    def stop(self, timeout_s: float = 30.0) -> bool:
        """SIGTERM and wait; True if it was running."""
        pid = self.pid()
        if pid is None:
            return False
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, os.WNOHANG)  # our own child (tests): reap it
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                break
            time.sleep(0.1)
        else:
            os.kill(pid, signal.SIGKILL)
        self.pid_file.unlink(missing_ok=True)
        return True


def local_prometheus(settings: Settings, port: int = PROMETHEUS_PORT) -> LocalPrometheus:
    return LocalPrometheus(
        port=port, directory=settings.run_dir / "prometheus", data_dir=settings.home / "prometheus"
    )


# --- what the stack calls --------------------------------------------------------------------


def announce_stage(settings: Settings, stage: str, workers: int) -> None:
    """List ``stage``'s workers and supervisor as scrape targets (``up`` started it)."""
    target_files(settings).write_stage(
        stage,
        base_port=stage_metrics_base(settings, stage),
        workers=workers,
        host=_scrape_host(settings.stage.metrics_host),
    )


def announce_ingest(settings: Settings) -> None:
    groups = [
        TargetGroup(
            (f"{_scrape_host(settings.ingest.host)}:{settings.ingest.port}",),
            {"stage": "ingest", "worker": "all"},
        )
    ]
    target_files(settings).write(JOB_INGEST, "ingest", groups)


def withdraw(settings: Settings, name: str) -> None:
    """``down`` stopped ``name`` (a stage or ``ingest``): no longer a target."""
    files = target_files(settings)
    files.remove_stage(name)
    files.remove(JOB_INGEST, name)


def start(
    settings: Settings, *, port: int = PROMETHEUS_PORT, echo: Callable[[str], None] = print
) -> LocalPrometheus:
    """Install Prometheus if needed, then start it (or reload it) with the generated config."""
    binary = ensure_installed(echo)
    prometheus = local_prometheus(settings, port)
    config = prometheus_config(targets_dir=target_files(settings).directory)
    prometheus.start(config, binary=binary)
    prometheus.wait_ready()
    echo(f"prometheus: {prometheus.url} (log {prometheus.log_file})")
    return prometheus


def _scrape_host(listen_host: str) -> str:
    return "127.0.0.1" if listen_host in ("0.0.0.0", "", "::") else listen_host


# --- the supervisor's metrics ----------------------------------------------------------------


def worker_exit_metrics(settings: Settings, stage: str, slots: int) -> Callable[[int, int], None]:
    """``on_exit(slot, code)`` for the stage supervisor: counts its workers' exits by code in
    ``streaminfer_worker_exits_total{stage,slot,code}``, served on ``metrics_port + 99``
    (nothing when no metrics port is set). Code 75 is the transactional watchdog; its series
    exist from the start at 0, so ``increase()`` sees the first one."""
    base = settings.stage.metrics_port
    if base is None:
        return lambda _slot, _code: None
    registry = CollectorRegistry()
    exits = counter(WORKER_EXITS, registry)
    for slot in range(slots):
        exits.labels(stage, str(slot), str(EXIT_STUCK)).inc(0)
    start_http_server(base + SUPERVISOR_OFFSET, addr=settings.stage.metrics_host, registry=registry)

    def on_exit(slot: int, code: int) -> None:
        exits.labels(stage, str(slot), str(code)).inc()

    return on_exit


# --- ingest with --workers N -----------------------------------------------------------------

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"  # read by prometheus-client when it is imported


def share_ingest_metrics(settings: Settings, *, port: int, workers: int) -> Path | None:
    """Before uvicorn starts ``workers`` > 1 processes: an empty directory of their own in
    which each worker's prometheus-client writes its values (multiprocess mode), named in the
    environment the workers inherit. Emptied first: values of a previous run would add up."""
    if workers <= 1:
        return None
    directory = settings.run_dir / f"ingest-{port}-metrics"
    shutil.rmtree(directory, ignore_errors=True)
    directory.mkdir(parents=True)
    # Written, for the workers to inherit (they read it back as settings.ingest.metrics_dir).
    os.environ.update({MULTIPROC_ENV: str(directory)})
    return directory


def multiprocess_metrics_dir(settings: Settings) -> str | None:
    """In an ingest worker: the shared metrics directory, if :func:`share_ingest_metrics`
    set one up. The worker's gauges leave the ``livesum`` when it exits."""
    directory = settings.ingest.metrics_dir
    if directory is None:
        return None
    atexit.register(multiprocess.mark_process_dead, os.getpid(), str(directory))
    return str(directory)

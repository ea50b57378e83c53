"""streaminfer/monitoring.py without Prometheus: ports, the supervisor's exit counter, and the
multiprocess directory of ingest."""

from __future__ import annotations

import socket
import threading
import urllib.request
from pathlib import Path

import pytest

from streaminfer import monitoring
from streaminfer.settings import Settings
from streaminfer.supervisor import RestartPolicy, Supervisor


def test_each_stage_gets_its_own_port_range() -> None:
    settings = Settings().with_changes(stage={"metrics_port": 9400})
    bases = [monitoring.stage_metrics_base(settings, s) for s in ("validate", "infer", "persist")]
    assert bases == [9400, 9500, 9600]
    assert monitoring.stage_env(settings, "infer")["STREAMINFER_STAGE_METRICS_PORT"] == "9500"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_the_supervisor_serves_worker_exits_by_code() -> None:
    base = free_port() - monitoring.SUPERVISOR_OFFSET
    settings = Settings().with_changes(stage={"metrics_port": base})
    on_exit = monitoring.worker_exit_metrics(settings, "infer", slots=2)
    url = f"http://127.0.0.1:{base + monitoring.SUPERVISOR_OFFSET}/metrics"

    def scrape() -> str:
        with urllib.request.urlopen(url, timeout=5) as response:
            return str(response.read().decode())

    watchdog = 'streaminfer_worker_exits_total{code="75",slot="%d",stage="infer"} %s'
    text = scrape()
    # There from the start at 0, so increase() in the alert sees the first exit.
    assert watchdog % (0, "0.0") in text and watchdog % (1, "0.0") in text
    on_exit(1, 75)
    on_exit(0, 1)
    text = scrape()
    assert watchdog % (1, "1.0") in text
    assert 'streaminfer_worker_exits_total{code="1",slot="0",stage="infer"} 1.0' in text


class ExitingChild:
    """A worker that exits with ``code`` at its first poll, then (restarted) keeps running."""

    def __init__(self, code: int | None) -> None:
        self.pid = 1234
        self.code = code
        self.stopped = False

    def poll(self) -> int | None:
        return 0 if self.stopped else self.code

    def send_signal(self, sig: int) -> None:
        self.stopped = True

    def kill(self) -> None:
        self.stopped = True

    def wait(self, timeout: float | None = None) -> int:
        return 0


def test_the_supervisor_reports_each_exit_with_its_code() -> None:
    stop = threading.Event()
    exits: list[tuple[int, int]] = []
    children = iter([ExitingChild(75), ExitingChild(None)])

    def on_exit(slot: int, code: int) -> None:
        exits.append((slot, code))

    def start(_slot: int) -> ExitingChild:
        child = next(children)
        if child.code is None:
            stop.set()  # the restarted worker is up: enough
        return child

    policy = RestartPolicy(backoff_s=0.01, backoff_max_s=0.01)
    code = Supervisor(label="infer", slots=1, start=start, policy=policy, on_exit=on_exit).run(stop)
    assert code == 0
    assert exits == [(0, 75)]


def test_ingest_workers_share_a_fresh_metrics_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("STREAMINFER_RUN_DIR", str(tmp_path))
    # Set, then removed: monkeypatch then restores the variable's absence after the test,
    # whatever share_ingest_metrics wrote.
    monkeypatch.setenv(monitoring.MULTIPROC_ENV, "unset")
    monkeypatch.delenv(monitoring.MULTIPROC_ENV)
    settings = Settings()
    assert monitoring.share_ingest_metrics(settings, port=8123, workers=1) is None
    stale = tmp_path / "ingest-8123-metrics" / "counter_1.db"
    stale.parent.mkdir()
    stale.write_bytes(b"old")
    directory = monitoring.share_ingest_metrics(settings, port=8123, workers=2)
    assert directory is not None and list(directory.iterdir()) == []
    # What a worker reads back from the environment it inherited
    assert Settings().ingest.metrics_dir == directory

"""The monitor against the real broker and the real Prometheus (Debian's package).

ResultV1 records go straight onto the test's results topic: version "1" of digits answers "7"
every time (far from the training distribution in model.yaml), version "2" cycles through
every label (close to it). ``streaminfer monitor`` runs as its own process; Prometheus scrapes
it every second and evaluates ops/prometheus/monitor-rules.yml. The drift alert's expression,
read from that file, must hold for version 1 and not for version 2, and the closed window must
be on the compacted inference.stats topic.

Not waiting for a wall-clock minute: the records carry Kafka timestamps in the last 10 s of the
minute before the test started (the windows are on those timestamps), and the monitor's grace
is chosen so that this minute closes 40 s after the start, once every record is in.
"""

from __future__ import annotations

import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import yaml

from monitor.records import decode_stats
from schemas import Codec, ResultV1, tensor_from_array
from streaminfer.kafka import make_producer
from streaminfer.monitoring import LocalPrometheus
from streaminfer.settings import Settings
from tests.fixtures import read_topic, wait_until
from tests.helpers import REPO

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(shutil.which("prometheus") is None, reason="prometheus not installed"),
]
RULES = REPO / "ops" / "prometheus" / "monitor-rules.yml"
PER_VERSION = 200  # well over the monitor's 50-result minimum for a drift score
CLOSES_AFTER_S = 40.0  # the test minute closes this long after the start (monitor start-up)
RESULTS = Codec(ResultV1)


@dataclass(frozen=True)
class Monitor:
    proc: subprocess.Popen[bytes]
    port: int
    minute_end: float  # the test minute's windows end here


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def drift_expression() -> str:
    groups = yaml.safe_load(RULES.read_text())["groups"]
    (expr,) = [r["expr"] for g in groups for r in g["rules"] if r.get("alert") == "ModelLabelDrift"]
    return str(expr)


def result(version: str, label: str, created_at: float) -> bytes:
    scores = {str(d): (0.91 if str(d) == label else 0.01) for d in range(10)}
    return RESULTS.encode(
        ResultV1(
            id=uuid.uuid4().hex,
            model="digits",
            model_version=version,
            status="ok",
            outputs={"label": tensor_from_array(np.array(int(label), dtype=np.int64))},
            created_at=created_at,
            label=label,
            scores=scores,
            timings={"validated": created_at + 0.01, "inferred": created_at + 0.02},
        )
    )


def produce_results(settings: Settings, window_end: float) -> None:
    """Version 1: all "7"; version 2: every label in turn. Kafka timestamps in the last 10 s
    of the window ending at ``window_end``."""
    producer = make_producer(settings)
    for i in range(PER_VERSION):
        at = window_end - 9.5 + 9.0 * i / PER_VERSION
        for version, label in (("1", "7"), ("2", str(i % 10))):
            value = result(version, label, created_at=at - 0.05)
            producer.produce(
                settings.topics.results, value=value, key=uuid.uuid4().hex, timestamp=int(at * 1000)
            )
    assert producer.flush(30) == 0


@pytest.fixture()
def monitor(settings: Settings, tmp_path: Path) -> Iterator[Monitor]:
    """``streaminfer monitor`` (its own virtualenv, created on first use) on a free port."""
    started = time.time()
    minute_end = math.floor(started / 60) * 60  # the minute before the test started ends here
    grace = started - minute_end + CLOSES_AFTER_S
    produce_results(settings, minute_end)
    port = free_port()
    log = (tmp_path / "monitor.log").open("wb")
    argv = [sys.executable, "-m", "streaminfer.cli", "monitor", "--port", str(port)]
    argv += ["--from-beginning", "--grace", f"{grace:.1f}"]
    proc = subprocess.Popen(argv, cwd=REPO, env=dict(os.environ), stdout=log, stderr=log)
    try:
        yield Monitor(proc=proc, port=port, minute_end=minute_end)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
        log.close()
        print((tmp_path / "monitor.log").read_text()[-3000:])


@pytest.fixture()
def prometheus(monitor: Monitor, tmp_path: Path) -> Iterator[LocalPrometheus]:
    config = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(RULES)],
        "scrape_configs": [
            {
                "job_name": "streaminfer-monitor",
                "static_configs": [{"targets": [f"127.0.0.1:{monitor.port}"]}],
            }
        ],
    }
    local = LocalPrometheus(
        port=free_port(), directory=tmp_path / "prometheus", data_dir=tmp_path / "tsdb"
    )
    local.start(yaml.safe_dump(config))
    try:
        local.wait_ready(timeout_s=30)
        yield local
    finally:
        local.stop()


def query(prometheus: LocalPrometheus, promql: str) -> list[dict[str, Any]]:
    response = httpx.get(f"{prometheus.url}/api/v1/query", params={"query": promql}, timeout=5)
    body = response.json()
    assert body["status"] == "success", f"{promql}: {body.get('error')}"
    found: list[dict[str, Any]] = body["data"]["result"]
    return found


def versions(series: list[dict[str, Any]]) -> set[str]:
    return {s["metric"]["version"] for s in series}


@pytest.mark.timeout(90)
def test_a_skewed_label_mix_makes_the_drift_alert_expression_true(
    settings: Settings, monitor: Monitor, prometheus: LocalPrometheus
) -> None:
    scored = 'streaminfer_monitor_drift_psi{window="1m"} >= 0'  # both versions' windows closed

    def closed() -> bool:
        assert monitor.proc.poll() is None, "the monitor exited; its log is printed below"
        return len(query(prometheus, scored)) == 2

    wait_until(closed, 60, "the 1-minute windows closed")

    assert versions(query(prometheus, drift_expression())) == {"1"}
    # Prometheus evaluates the rule itself (every second): pending, as it wants 5 minutes.
    alerts = 'ALERTS{alertname="ModelLabelDrift"}'
    wait_until(lambda: query(prometheus, alerts) != [], 10, "the rule was evaluated")
    pending = query(prometheus, alerts)
    assert versions(pending) == {"1"}
    assert pending[0]["metric"]["alertstate"] == "pending"
    share = query(prometheus, 'streaminfer_monitor_label_share_ratio{window="1m",label="7"}')
    assert {s["metric"]["version"]: float(s["value"][1]) for s in share} == {"1": 1.0, "2": 0.1}

    closed = [decode_stats(m.value()) for m in read_topic(settings, settings.topics.stats, count=4)]
    minute = {s.model_version: s for s in closed if s.window == "1m"}
    assert minute["1"].requests == minute["2"].requests == PER_VERSION
    assert minute["1"].end == monitor.minute_end
    assert minute["1"].label_counts == {"7": PER_VERSION}
    assert minute["1"].drift_psi is not None and minute["1"].drift_psi > 0.2
    assert minute["2"].drift_psi is not None and minute["2"].drift_psi < 0.1
    assert minute["1"].mean_score == pytest.approx(0.91)
    assert minute["1"].inferred_p99_s == pytest.approx(0.02, rel=0.03)

"""The local stack with monitoring, against the real Prometheus (Debian's package).

``stack.up(monitoring=True)`` starts the three stages (metrics on their own ports), ingest
with two uvicorn workers (multiprocess metrics) and Prometheus, which finds every worker
through the file_sd files. After some traffic, every query of the Grafana dashboard must parse
and return at least one series, and ingest's /metrics must add up both workers.
"""

from __future__ import annotations

import random
import shutil
import socket
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from streaminfer import monitoring, stack
from streaminfer.kafka import make_producer
from streaminfer.settings import Settings
from streaminfer.wiring import STAGE_NAMES
from tests.fixtures import wait_until
from tests.unit.ops.test_prometheus_rules import dashboard_queries

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(shutil.which("prometheus") is None, reason="prometheus not installed"),
]
DIGITS = {"model": "digits", "inputs": {"input": [float(i % 17) for i in range(64)]}}
ACCEPTED_POSTS = 12


def _free(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def free_metrics_base() -> int:
    """A base port whose stage ranges (slot 0 and the supervisor of each stage) are free."""
    stride, offset = monitoring.STAGE_PORT_STRIDE, monitoring.SUPERVISOR_OFFSET
    for _ in range(100):
        base = random.randrange(20_000, 60_000, 100)
        ports = [base + i * stride + k for i in range(len(STAGE_NAMES)) for k in (0, offset)]
        if all(_free(p) for p in ports):
            return base
    raise AssertionError("no free port range for the stage metrics")


@pytest.fixture()
def monitored(
    settings: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[tuple[Settings, monitoring.LocalPrometheus]]:
    """The stack with monitoring; Kafka and Redis are the session's (external to the stack,
    so its own home directory and ports never touch theirs)."""
    env = {
        "KAFKA_BOOTSTRAP_SERVERS": settings.kafka.bootstrap_servers,
        "REDIS_URL": settings.redis.url.get_secret_value(),
        "STREAMINFER_HOME": str(tmp_path / "home"),
        "STREAMINFER_STAGE_METRICS_PORT": str(free_metrics_base()),
        "STREAMINFER_INGEST_PORT": str(free_port()),
        "STREAMINFER_INGEST_WORKERS": "2",
    }
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    local = Settings()
    port = free_port()
    try:
        stack.up(local, monitoring=True, prometheus_port=port, echo=lambda _line: None)
        prometheus = monitoring.local_prometheus(local, port)
        # Scrape every second: the rates of the dashboard fill within seconds.
        targets = monitoring.target_files(local).directory
        prometheus.start(monitoring.prometheus_config(targets_dir=targets, scrape_interval_s=1))
        stack.wait_for_stages(local, timeout_s=90)
        yield local, prometheus
    finally:
        stack.down(local, only=[stack.INGEST, *STAGE_NAMES, stack.PROMETHEUS], echo=print)


def query(prometheus: monitoring.LocalPrometheus, promql: str) -> list[dict[str, Any]]:
    """The series of an instant query; raises on a query Prometheus refuses."""
    response = httpx.get(f"{prometheus.url}/api/v1/query", params={"query": promql}, timeout=10)
    body = response.json()
    assert body["status"] == "success", f"{promql}: {body.get('error')}"
    result: list[dict[str, Any]] = body["data"]["result"]
    return result


def send_traffic(settings: Settings) -> None:
    api = f"http://127.0.0.1:{settings.ingest.port}"
    wait_until(lambda: _ready(api), 60, "ingest is ready")
    with httpx.Client(base_url=api, timeout=10) as client:
        for _ in range(ACCEPTED_POSTS):  # over both uvicorn workers
            batch = [{**DIGITS, "id": uuid.uuid4().hex} for _ in range(5)]
            assert client.post("/v1/requests", json=batch).status_code == 202
        assert client.post("/v1/requests", json={"model": 1}).status_code == 422
    # Straight onto Kafka, past ingest's checks: validate dead-letters it (DLQ by reason).
    producer = make_producer(settings)
    producer.produce(settings.topics.requests, value=b"not msgpack", key=b"bad")
    assert producer.flush(30) == 0


def _ready(api: str) -> bool:
    try:
        return httpx.get(f"{api}/readyz", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def test_every_dashboard_query_returns_series(
    monitored: tuple[Settings, monitoring.LocalPrometheus],
) -> None:
    settings, prometheus = monitored
    live = 'count by (job) (up{job=~"streaminfer-.*"} == 1)'
    wait_until(lambda: len(query(prometheus, live)) == 3, 60, "every job has a live target")
    send_traffic(settings)
    stored = "sum(streaminfer_end_to_end_latency_seconds_count)"
    wait_until(
        lambda: any(float(s["value"][1]) >= 5 * ACCEPTED_POSTS for s in query(prometheus, stored)),
        120,
        "Prometheus saw every request stored",
    )
    empty: list[str] = []

    def all_answer() -> bool:
        empty[:] = [f"{t}: {q}" for t, q in dashboard_queries() if not query(prometheus, q)]
        return not empty

    try:
        wait_until(all_answer, 60, "every dashboard query returns a series")
    except AssertionError as exc:
        raise AssertionError(f"{exc}; still empty: {empty}") from None

    workers = query(prometheus, 'up{job="streaminfer-stage"}')
    assert sorted(s["metric"]["stage"] for s in workers) == sorted(STAGE_NAMES)
    # Two uvicorn workers, one coherent /metrics: every 202 counted once, whichever served it.
    accepted = 'sum(streaminfer_http_requests_total{route="/v1/requests",status="202"})'
    assert float(query(prometheus, accepted)[0]["value"][1]) == ACCEPTED_POSTS
    dlq = query(prometheus, 'streaminfer_dlq_records_total{stage="validate"}')
    assert {s["metric"]["reason"] for s in dlq} == {"malformed"}

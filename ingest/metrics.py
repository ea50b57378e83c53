"""Ingest metrics: the small interface the app is handed, and its Prometheus implementation.

Names (``streaminfer_<thing>_<unit>``):

- ``streaminfer_http_requests_total{route,method,status}``
- ``streaminfer_http_request_duration_seconds{route,method}`` (histogram)
- ``streaminfer_records_produced_total{stage="ingest"}``: records Kafka acknowledged
- ``streaminfer_producer_queue_records``: records queued or in flight in the producer
- ``streaminfer_predict_outcomes_total{outcome}``: ok, dead_lettered, timeout
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)


class IngestMetrics(Protocol):
    def http_request(self, *, route: str, method: str, status: int, seconds: float) -> None: ...
    def records_produced(self, count: int) -> None: ...
    def predict_outcome(self, outcome: str) -> None: ...


class PrometheusIngestMetrics:
    """Prometheus metrics of one ingest process; ``queue_depth`` is read at scrape time."""

    def __init__(self, *, registry: CollectorRegistry, queue_depth: Callable[[], int]) -> None:
        self._requests = Counter(
            "streaminfer_http_requests",
            "HTTP requests by route and status",
            ["route", "method", "status"],
            registry=registry,
        )
        self._latency = Histogram(
            "streaminfer_http_request_duration_seconds",
            "HTTP request latency, first byte in to last byte out",
            ["route", "method"],
            buckets=_LATENCY_BUCKETS,
            registry=registry,
        )
        self._produced = Counter(
            "streaminfer_records_produced", "Records produced", ["stage"], registry=registry
        ).labels("ingest")
        self._predict = Counter(
            "streaminfer_predict_outcomes",
            "POST /v1/predict outcomes",
            ["outcome"],
            registry=registry,
        )
        queue = Gauge(
            "streaminfer_producer_queue_records",
            "Records queued in the producer, not yet acknowledged by Kafka",
            registry=registry,
        )
        queue.set_function(lambda: float(queue_depth()))

    def http_request(self, *, route: str, method: str, status: int, seconds: float) -> None:
        self._requests.labels(route, method, str(status)).inc()
        self._latency.labels(route, method).observe(seconds)

    def records_produced(self, count: int) -> None:
        self._produced.inc(count)

    def predict_outcome(self, outcome: str) -> None:
        self._predict.labels(outcome).inc()

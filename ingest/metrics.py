"""Ingest metrics: the small interface the app is handed, and its Prometheus implementation.

The names are listed with every other metric in :mod:`stages.metrics`:
``streaminfer_http_requests_total{route,method,status}``,
``streaminfer_http_request_duration_seconds{route,method}``,
``streaminfer_http_requests_in_flight``, ``streaminfer_produce_ack_seconds``,
``streaminfer_records_produced_total{stage="ingest"}``, ``streaminfer_producer_queue_records``,
``streaminfer_predict_outcomes_total{outcome}``.

With ``--workers N`` every worker writes its values to prometheus-client's multiprocess
directory and ``/metrics`` (:func:`multiprocess_registry`) adds them up, so one scrape sees the
whole server. The gauges are ``livesum``: the sum over the workers alive.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

from prometheus_client import CollectorRegistry
from prometheus_client.multiprocess import MultiProcessCollector

from stages.metrics import (
    HTTP_IN_FLIGHT,
    HTTP_REQUESTS,
    HTTP_SECONDS,
    LATENCY_BUCKETS,
    PREDICT_OUTCOMES,
    PRODUCE_ACK_SECONDS,
    PRODUCER_QUEUE,
    RECORDS_PRODUCED,
    counter,
    gauge,
    histogram,
)


class IngestMetrics(Protocol):
    def http_request(self, *, route: str, method: str, status: int, seconds: float) -> None: ...
    def in_flight(self, delta: int) -> None: ...
    def records_produced(self, count: int) -> None: ...
    def produce_acknowledged(self, seconds: float) -> None: ...
    def predict_outcome(self, outcome: str) -> None: ...


class PrometheusIngestMetrics:
    """Prometheus metrics of one ingest process. ``queue_depth`` is read after every request
    (not at scrape time: in multiprocess mode the scrape may be served by another worker)."""

    def __init__(self, *, registry: CollectorRegistry, queue_depth: Callable[[], int]) -> None:
        self._queue_depth = queue_depth
        self._requests = counter(HTTP_REQUESTS, registry)
        self._latency = histogram(HTTP_SECONDS, registry, LATENCY_BUCKETS)
        self._in_flight = gauge(HTTP_IN_FLIGHT, registry, multiprocess_mode="livesum")
        self._produced = counter(RECORDS_PRODUCED, registry).labels("ingest")
        self._ack = histogram(PRODUCE_ACK_SECONDS, registry, LATENCY_BUCKETS)
        self._queue = gauge(PRODUCER_QUEUE, registry, multiprocess_mode="livesum")
        self._predict = counter(PREDICT_OUTCOMES, registry)
        # (route, method, status) -> the request counter's inc and the latency's observe
        self._series: dict[
            tuple[str, str, int], tuple[Callable[[], None], Callable[[float], None]]
        ] = {}

    def http_request(self, *, route: str, method: str, status: int, seconds: float) -> None:
        series = self._series.get((route, method, status))
        if series is None:  # labels() takes a lock and validates: once per label set
            series = (
                self._requests.labels(route, method, str(status)).inc,
                self._latency.labels(route, method).observe,
            )
            self._series[(route, method, status)] = series
        count, observe = series
        count()
        observe(seconds)
        self._queue.set(self._queue_depth())

    def in_flight(self, delta: int) -> None:
        self._in_flight.inc(delta)

    def records_produced(self, count: int) -> None:
        self._produced.inc(count)

    def produce_acknowledged(self, seconds: float) -> None:
        self._ack.observe(seconds)

    def predict_outcome(self, outcome: str) -> None:
        self._predict.labels(outcome).inc()


def multiprocess_registry(path: str) -> CollectorRegistry:
    """A registry that reads what every worker wrote under ``path`` (the directory in
    ``PROMETHEUS_MULTIPROC_DIR``, set before the workers started)."""
    registry = CollectorRegistry()
    MultiProcessCollector(registry, path=path)  # type: ignore[no-untyped-call]  # untyped
    return registry

"""Stage metrics: a small interface the runtime is handed, and its Prometheus implementation.

Every metric name lives here (``streaminfer_<thing>_<unit>``).
"""

from __future__ import annotations

from typing import Protocol

from prometheus_client import CollectorRegistry, Counter, Histogram


class StageMetrics(Protocol):
    def batch(self, *, size: int, seconds: float) -> None: ...
    def records_out(self, count: int) -> None: ...
    def dead_lettered(self, reason: str) -> None: ...
    def end_to_end(self, seconds: float) -> None: ...
    def retry(self) -> None: ...


class NullMetrics:
    """Metrics that go nowhere (tests, one-off runs)."""

    def batch(self, *, size: int, seconds: float) -> None:
        pass

    def records_out(self, count: int) -> None:
        pass

    def dead_lettered(self, reason: str) -> None:
        pass

    def end_to_end(self, seconds: float) -> None:
        pass

    def retry(self) -> None:
        pass


class PrometheusStageMetrics:
    """Prometheus metrics for one stage process, labelled by stage."""

    def __init__(self, *, stage: str, registry: CollectorRegistry) -> None:
        self._stage = stage
        labels = ["stage"]
        self._records_in = Counter(
            "streaminfer_records_consumed", "Records consumed", labels, registry=registry
        )
        self._records_out = Counter(
            "streaminfer_records_produced", "Records produced", labels, registry=registry
        )
        self._dlq = Counter(
            "streaminfer_dlq_records",
            "Records dead-lettered",
            [*labels, "reason"],
            registry=registry,
        )
        self._retries = Counter(
            "streaminfer_batch_retries", "Batches rewound and retried", labels, registry=registry
        )
        self._batch_size = Histogram(
            "streaminfer_batch_size_records",
            "Records per consumed batch",
            labels,
            buckets=(1, 10, 50, 100, 250, 500, 1000, 2000),
            registry=registry,
        )
        self._batch_seconds = Histogram(
            "streaminfer_stage_latency_seconds",
            "Time to process and commit one batch",
            labels,
            registry=registry,
        )
        self._e2e = Histogram(
            "streaminfer_end_to_end_latency_seconds",
            "From request created_at to this stage",
            labels,
            registry=registry,
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
        )

    def batch(self, *, size: int, seconds: float) -> None:
        self._records_in.labels(self._stage).inc(size)
        self._batch_size.labels(self._stage).observe(size)
        self._batch_seconds.labels(self._stage).observe(seconds)

    def records_out(self, count: int) -> None:
        self._records_out.labels(self._stage).inc(count)

    def dead_lettered(self, reason: str) -> None:
        self._dlq.labels(self._stage, reason).inc()

    def end_to_end(self, seconds: float) -> None:
        self._e2e.labels(self._stage).observe(seconds)

    def retry(self) -> None:
        self._retries.labels(self._stage).inc()

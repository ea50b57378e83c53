"""Metrics: the small interface the stage runtime is handed, its Prometheus implementation,
and every metric name of the product (``streaminfer_<thing>_<unit>``), listed once in
:data:`METRICS` (the README's table is :func:`markdown_table`).

A stage worker serves its own registry on ``STREAMINFER_STAGE_METRICS_PORT + slot``; ingest
serves ``/metrics`` on its HTTP port (one coherent view over ``--workers N``: prometheus-client
multiprocess mode). Counters get Prometheus's ``_total`` suffix on the wire.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass
from typing import Final, Literal, Protocol

from confluent_kafka import Consumer, TopicPartition
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

Partition = tuple[str, int]
Kind = Literal["counter", "gauge", "histogram"]
Source = Literal["stage", "infer", "persist", "ingest", "supervisor"]
GaugeMode = Literal["all", "livesum", "max", "mostrecent"]


@dataclass(frozen=True, slots=True)
class MetricName:
    """One metric: its name (without ``_total``), kind, labels and meaning."""

    name: str
    kind: Kind
    labels: tuple[str, ...]
    help: str
    where: Source = "stage"

    @property
    def exposed(self) -> str:
        return f"{self.name}_total" if self.kind == "counter" else self.name


def _m(name: str, kind: Kind, labels: str, help: str, where: Source = "stage") -> MetricName:
    return MetricName(name, kind, tuple(labels.split()), help, where)


RECORDS_CONSUMED = _m("streaminfer_records_consumed", "counter", "stage", "Records consumed")
RECORDS_PRODUCED = _m(
    "streaminfer_records_produced", "counter", "stage", "Records produced (outputs, not DLQ)"
)
DLQ_RECORDS = _m("streaminfer_dlq_records", "counter", "stage reason", "Records dead-lettered")
BATCH_SIZE = _m(
    "streaminfer_batch_size_records", "histogram", "stage", "Records per consumed batch"
)
BATCH_SECONDS = _m(
    "streaminfer_stage_latency_seconds",
    "histogram",
    "stage",
    "Time to process and publish one batch",
)
RETRIES = _m(
    "streaminfer_batch_retries",
    "counter",
    "stage",
    "Batches rewound and retried (aborted transaction, lost partitions, transient failure)",
)
BACKOFFS = _m(
    "streaminfer_backoffs",
    "counter",
    "stage",
    "Back-offs: partitions paused after a transient failure",
)
BACKOFF_SECONDS = _m(
    "streaminfer_backoff_seconds", "counter", "stage", "Seconds of back-off asked for"
)
PAUSED_PARTITIONS = _m(
    "streaminfer_paused_partitions",
    "gauge",
    "stage",
    "Assigned partitions paused (back-off or live-first priority)",
)
CONSUMER_LAG = _m(
    "streaminfer_consumer_lag_records",
    "gauge",
    "stage topic partition",
    "Records behind the end of each assigned partition (position vs cached high watermark)",
)
TXN_COMMIT_SECONDS = _m(
    "streaminfer_transaction_commit_seconds",
    "histogram",
    "stage",
    "send_offsets_to_transaction + commit_transaction",
)
TXN_ABORTS = _m("streaminfer_transaction_aborts", "counter", "stage", "Kafka transactions aborted")
END_TO_END = _m(
    "streaminfer_end_to_end_latency_seconds",
    "histogram",
    "stage",
    "From the request's created_at to stored in Redis",
    "persist",
)
REDIS_SECONDS = _m(
    "streaminfer_redis_command_seconds",
    "histogram",
    "stage command",
    "Redis round trips (a pipeline counts once)",
    "persist",
)
REDIS_ERRORS = _m(
    "streaminfer_redis_errors", "counter", "stage command", "Redis commands that failed", "persist"
)
REDIS_UP = _m(
    "streaminfer_redis_up",
    "gauge",
    "stage",
    "1 if the last Redis command succeeded, 0 if it failed",
    "persist",
)
REDIS_OOM = _m(
    "streaminfer_redis_oom",
    "counter",
    "stage",
    "Redis writes refused for lack of memory (maxmemory reached, nothing evictable)",
    "persist",
)
MODEL_REQUESTS = _m(
    "streaminfer_model_requests",
    "counter",
    "model version",
    "Requests run through a model version",
    "infer",
)
MODEL_RUNS = _m(
    "streaminfer_model_runs",
    "counter",
    "model version",
    "session.run calls (average batch = requests / runs)",
    "infer",
)
MODEL_QUEUE_SECONDS = _m(
    "streaminfer_model_queue_seconds",
    "histogram",
    "model version",
    "Per run: from its batch being consumed to session.run starting",
    "infer",
)
MODEL_COMPUTE_SECONDS = _m(
    "streaminfer_model_compute_seconds",
    "histogram",
    "model version",
    "Per run: session.run",
    "infer",
)
HTTP_REQUESTS = _m(
    "streaminfer_http_requests",
    "counter",
    "route method status",
    "HTTP requests by route and status",
    "ingest",
)
HTTP_SECONDS = _m(
    "streaminfer_http_request_duration_seconds",
    "histogram",
    "route method",
    "HTTP request latency, first byte in to last byte out",
    "ingest",
)
HTTP_IN_FLIGHT = _m(
    "streaminfer_http_requests_in_flight",
    "gauge",
    "",
    "HTTP requests being served (all workers)",
    "ingest",
)
PRODUCE_ACK_SECONDS = _m(
    "streaminfer_produce_ack_seconds",
    "histogram",
    "",
    "From queuing a request batch to Kafka acknowledging all of it",
    "ingest",
)
PRODUCER_QUEUE = _m(
    "streaminfer_producer_queue_records",
    "gauge",
    "",
    "Records queued in the producer, not yet acknowledged (all workers)",
    "ingest",
)
PREDICT_OUTCOMES = _m(
    "streaminfer_predict_outcomes",
    "counter",
    "outcome",
    "POST /v1/predict outcomes: ok, dead_lettered, timeout",
    "ingest",
)
PROCESSOR_SECONDS = _m(
    "streaminfer_processor_seconds",
    "histogram",
    "model processor hook",
    "Per batch of a model: one processor hook (parse in validate, preprocess/postprocess in infer)",
)
WORKER_EXITS = _m(
    "streaminfer_worker_exits",
    "counter",
    "stage slot code",
    "Worker processes that exited while the stage ran "
    "(code 75: transactional watchdog, or stuck rejoining)",
    "supervisor",
)

METRICS: Final[tuple[MetricName, ...]] = (
    RECORDS_CONSUMED,
    RECORDS_PRODUCED,
    DLQ_RECORDS,
    BATCH_SIZE,
    BATCH_SECONDS,
    RETRIES,
    BACKOFFS,
    BACKOFF_SECONDS,
    PAUSED_PARTITIONS,
    CONSUMER_LAG,
    TXN_COMMIT_SECONDS,
    TXN_ABORTS,
    END_TO_END,
    REDIS_SECONDS,
    REDIS_ERRORS,
    REDIS_UP,
    REDIS_OOM,
    MODEL_REQUESTS,
    MODEL_RUNS,
    MODEL_QUEUE_SECONDS,
    MODEL_COMPUTE_SECONDS,
    PROCESSOR_SECONDS,
    HTTP_REQUESTS,
    HTTP_SECONDS,
    HTTP_IN_FLIGHT,
    PRODUCE_ACK_SECONDS,
    PRODUCER_QUEUE,
    PREDICT_OUTCOMES,
    WORKER_EXITS,
)

LATENCY_BUCKETS: Final = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1,
    2.5,
    5,
    10,
    30,
)
E2E_BUCKETS: Final = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
BATCH_BUCKETS: Final = (1, 10, 50, 100, 250, 500, 1000, 2000)
FAST_BUCKETS: Final = (
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.5,
    1,
)


def markdown_table() -> str:
    """The README's metrics table."""
    rows = ["| metric | type | labels | from | meaning |", "| --- | --- | --- | --- | --- |"]
    for m in METRICS:
        labels = ", ".join(m.labels) or "-"
        rows.append(f"| `{m.exposed}` | {m.kind} | {labels} | {m.where} | {m.help} |")
    return "\n".join(rows)


def counter(m: MetricName, registry: CollectorRegistry | None) -> Counter:
    assert m.kind == "counter"
    return Counter(m.name, m.help, m.labels, registry=registry)


def histogram(
    m: MetricName, registry: CollectorRegistry | None, buckets: tuple[float, ...]
) -> Histogram:
    assert m.kind == "histogram"
    return Histogram(m.name, m.help, m.labels, buckets=buckets, registry=registry)


def gauge(
    m: MetricName, registry: CollectorRegistry | None, *, multiprocess_mode: GaugeMode = "all"
) -> Gauge:
    assert m.kind == "gauge"
    return Gauge(m.name, m.help, m.labels, registry=registry, multiprocess_mode=multiprocess_mode)


class StageMetrics(Protocol):
    """What a stage worker reports. Implementations: :class:`NullMetrics`,
    :class:`PrometheusStageMetrics`."""

    def batch(self, *, size: int, seconds: float) -> None: ...
    def records_out(self, count: int) -> None: ...
    def dead_lettered(self, reason: str) -> None: ...
    def end_to_end(self, seconds: float) -> None: ...
    def retry(self) -> None: ...
    def redis_oom(self) -> None: ...
    def backoff(self, seconds: float) -> None: ...
    def assignment(self, *, lags: Mapping[Partition, int], paused: int) -> None:
        """The lag of every assigned partition whose lag is known, and how many are
        paused; partitions not in ``lags`` (revoked, or not fetched yet) drop out."""
        ...

    def transaction_committed(self, seconds: float) -> None: ...
    def transaction_aborted(self) -> None: ...
    def model_run(
        self, *, model: str, version: str, requests: int, queue_s: float, compute_s: float
    ) -> None: ...
    def processor_run(
        self, *, model: str, processor: str, hook: str, rows: int, seconds: float
    ) -> None: ...
    def redis_command(self, *, command: str, seconds: float, ok: bool) -> None: ...


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

    def redis_oom(self) -> None:
        pass

    def backoff(self, seconds: float) -> None:
        pass

    def assignment(self, *, lags: Mapping[Partition, int], paused: int) -> None:
        pass

    def transaction_committed(self, seconds: float) -> None:
        pass

    def transaction_aborted(self) -> None:
        pass

    def model_run(
        self, *, model: str, version: str, requests: int, queue_s: float, compute_s: float
    ) -> None:
        pass

    def processor_run(
        self, *, model: str, processor: str, hook: str, rows: int, seconds: float
    ) -> None:
        pass

    def redis_command(self, *, command: str, seconds: float, ok: bool) -> None:
        pass


class PrometheusStageMetrics:
    """Prometheus metrics for one stage process, labelled by stage."""

    def __init__(self, *, stage: str, registry: CollectorRegistry) -> None:
        self._stage = stage
        self._records_in = counter(RECORDS_CONSUMED, registry).labels(stage)
        self._records_out = counter(RECORDS_PRODUCED, registry).labels(stage)
        self._dlq = counter(DLQ_RECORDS, registry)
        self._retries = counter(RETRIES, registry).labels(stage)
        self._backoffs = counter(BACKOFFS, registry).labels(stage)
        self._backoff_s = counter(BACKOFF_SECONDS, registry).labels(stage)
        self._paused = gauge(PAUSED_PARTITIONS, registry).labels(stage)
        self._lag = gauge(CONSUMER_LAG, registry)
        self._lag_shown: set[Partition] = set()
        # Only some stages commit transactions, write Redis or see end-to-end times: those
        # series appear on first use, so that no stage shows e.g. a Redis that is "down".
        self._txn_s = histogram(TXN_COMMIT_SECONDS, registry, LATENCY_BUCKETS)
        self._txn_aborts = counter(TXN_ABORTS, registry).labels(stage)
        self._batch_size = histogram(BATCH_SIZE, registry, BATCH_BUCKETS).labels(stage)
        self._batch_s = histogram(BATCH_SECONDS, registry, LATENCY_BUCKETS).labels(stage)
        self._e2e = histogram(END_TO_END, registry, E2E_BUCKETS)
        self._e2e_stage: Histogram | None = None  # the stage's series, once first observed
        self._redis_s = histogram(REDIS_SECONDS, registry, FAST_BUCKETS)
        self._redis_errors = counter(REDIS_ERRORS, registry)
        self._redis_up = gauge(REDIS_UP, registry)
        self._redis_oom = counter(REDIS_OOM, registry).labels(stage)
        self._model_requests = counter(MODEL_REQUESTS, registry)
        self._model_runs = counter(MODEL_RUNS, registry)
        self._model_queue_s = histogram(MODEL_QUEUE_SECONDS, registry, FAST_BUCKETS)
        self._model_compute_s = histogram(MODEL_COMPUTE_SECONDS, registry, FAST_BUCKETS)
        self._processor_s = histogram(PROCESSOR_SECONDS, registry, FAST_BUCKETS)
        self._paused.set(0)
        self._retries.inc(0)  # every series exists from the start: rate() works at once
        self._txn_aborts.inc(0)

    def batch(self, *, size: int, seconds: float) -> None:
        self._records_in.inc(size)
        self._batch_size.observe(size)
        self._batch_s.observe(seconds)

    def records_out(self, count: int) -> None:
        self._records_out.inc(count)

    def dead_lettered(self, reason: str) -> None:
        self._dlq.labels(self._stage, reason).inc()

    def end_to_end(self, seconds: float) -> None:
        # Validate refuses non-finite times, but infer and persist also read records written
        # straight to their topics: one NaN would make the histogram's sum NaN for good.
        if math.isfinite(seconds):
            if self._e2e_stage is None:  # labels() per call would cost as much as observe()
                self._e2e_stage = self._e2e.labels(self._stage)
            self._e2e_stage.observe(seconds)

    def retry(self) -> None:
        self._retries.inc()

    def redis_oom(self) -> None:
        self._redis_oom.inc()

    def backoff(self, seconds: float) -> None:
        self._backoffs.inc()
        self._backoff_s.inc(max(0.0, seconds))

    def assignment(self, *, lags: Mapping[Partition, int], paused: int) -> None:
        self._paused.set(paused)
        for topic, partition in self._lag_shown - lags.keys():
            self._lag.remove(self._stage, topic, str(partition))
        for (topic, partition), lag in lags.items():
            self._lag.labels(self._stage, topic, str(partition)).set(lag)
        self._lag_shown = set(lags)

    def transaction_committed(self, seconds: float) -> None:
        self._txn_s.labels(self._stage).observe(seconds)

    def transaction_aborted(self) -> None:
        self._txn_aborts.inc()

    def model_run(
        self, *, model: str, version: str, requests: int, queue_s: float, compute_s: float
    ) -> None:
        self._model_requests.labels(model, version).inc(requests)
        self._model_runs.labels(model, version).inc()
        self._model_queue_s.labels(model, version).observe(max(0.0, queue_s))
        self._model_compute_s.labels(model, version).observe(compute_s)

    def processor_run(
        self, *, model: str, processor: str, hook: str, rows: int, seconds: float
    ) -> None:
        self._processor_s.labels(model, processor, hook).observe(seconds)

    def redis_command(self, *, command: str, seconds: float, ok: bool) -> None:
        self._redis_s.labels(self._stage, command).observe(seconds)
        self._redis_up.labels(self._stage).set(1 if ok else 0)
        if not ok:
            self._redis_errors.labels(self._stage, command).inc()


def partition_lags(consumer: Consumer, partitions: Collection[Partition]) -> dict[Partition, int]:
    """Per partition: its cached high watermark (the last fetch response's; with
    ``read_committed`` the last stable offset) minus the consumer's position. No broker round
    trip. A partition that has no position yet (nothing consumed since it was assigned) or no
    cached watermark is left out: its lag is unknown, not zero."""
    tps = [TopicPartition(t, p) for t, p in sorted(partitions)]
    lags: dict[Partition, int] = {}
    for tp in consumer.position(tps) if tps else []:
        if tp.offset < 0:
            continue
        _low, high = consumer.get_watermark_offsets(tp, cached=True)
        if high >= 0:
            lags[(tp.topic, tp.partition)] = max(0, high - tp.offset)
    return lags


class AssignmentGauges:
    """Reports the assignment's lag and pauses to ``metrics`` at most every ``interval_s``
    (the runtime calls :meth:`sample` once per loop)."""

    def __init__(
        self,
        consumer: Consumer,
        metrics: StageMetrics,
        *,
        interval_s: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._consumer = consumer
        self._metrics = metrics
        self._interval_s = interval_s
        self._clock = clock
        self._next = 0.0

    def sample(self, assigned: Collection[Partition], *, paused: int) -> None:
        now = self._clock()
        if now < self._next or isinstance(self._metrics, NullMetrics):
            return
        self._next = now + self._interval_s
        self._metrics.assignment(lags=partition_lags(self._consumer, assigned), paused=paused)

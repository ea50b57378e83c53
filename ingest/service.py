"""What the HTTP routes do, without HTTP: submit, predict, look up, check readiness.

:class:`IngestService` owns one process's clients: the Kafka producer (polled by its own
thread), an asyncio Redis client, the result waiters (one pub/sub connection) and the DLQ
watcher. Build it with :func:`build_service`; ``start()`` and ``close()`` run in the app's
lifespan, inside the worker process.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass

import redis
import redis.asyncio as aioredis
from confluent_kafka import Consumer, Producer

from ingest.delivery import AsyncProducer, Delivery
from ingest.dlq_watcher import DlqWatcher
from ingest.errors import ApiError
from ingest.metrics import IngestMetrics
from ingest.payloads import RequestDecoder, Submission
from ingest.waiters import DeadLettered, Outcome, ResultWaiters, Stored
from sinks.redis_store import ResultStore
from streaminfer.kafka import make_consumer, make_producer
from streaminfer.settings import Settings
from streaminfer.wiring import model_registry

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Timeouts:
    delivery_s: float
    probe_s: float
    unavailable_retry_s: int


class IngestService:
    """Submit requests, wait for results, look them up. Every method runs on the event loop
    and never blocks it (Kafka metadata calls go to a worker thread)."""

    def __init__(
        self,
        *,
        settings: Settings,
        decoder: RequestDecoder,
        kafka: Producer,
        redis_client: aioredis.Redis,
        metrics: IngestMetrics,
    ) -> None:
        self.decoder = decoder
        self.metrics = metrics
        self._settings = settings
        self._kafka = kafka
        self._redis = redis_client
        # Only for the key and channel names (one definition, in sinks/): this client is never
        # used, so it never connects.
        self._names = ResultStore(client=redis.Redis(), ttl_s=1, prefix=settings.kafka.topic_prefix)
        self._timeouts = Timeouts(
            delivery_s=settings.ingest.delivery_timeout_s,
            probe_s=settings.ingest.probe_timeout_s,
            unavailable_retry_s=settings.ingest.unavailable_retry_after_s,
        )
        self.producer = AsyncProducer(
            producer=kafka,
            topic=settings.topics.requests,
            queue_limit=settings.ingest.queue_max_records,
        )
        self.waiters = ResultWaiters(
            client=redis_client,
            channel_prefix=self._names.channel(""),
            confirm_timeout_s=settings.ingest.probe_timeout_s,
        )
        self._dlq: DlqWatcher | None = None
        self._reader: asyncio.Task[None] | None = None

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self.producer.start()
        self._reader = loop.create_task(self.waiters.run(), name="result-notifications")
        self._dlq = DlqWatcher(
            consumer_factory=self._dlq_consumer,
            topic=self._settings.topics.dlq,
            wanted=self.waiters.is_waiting,
            notify=lambda rid, dead: self._on_loop(loop, rid, dead),
        )
        self._dlq.start()

    def _on_loop(
        self, loop: asyncio.AbstractEventLoop, request_id: str, dead: DeadLettered
    ) -> None:
        loop.call_soon_threadsafe(self.waiters.settle, request_id, dead)

    async def close(self) -> None:
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader
        if self._dlq is not None:
            await asyncio.to_thread(self._dlq.stop)
        unsent = await asyncio.to_thread(self.producer.close, self._timeouts.delivery_s)
        if unsent:
            log.warning("%d records were not acknowledged by Kafka at shutdown", unsent)
        await self._redis.aclose()  # also closes the waiters' pub/sub connection

    async def submit(self, submissions: list[Submission]) -> list[str]:
        """Produce every submission; returns their ids once Kafka acknowledged all of them.

        Raises ``QueueFull`` (nothing queued), or an :class:`ApiError` naming the ids Kafka
        acknowledged and those it did not: 429 when the queue filled up part-way, else 503.
        """
        future = self.producer.send(submissions)
        try:
            # librdkafka reports a timeout itself after delivery.timeout.ms; the margin only
            # guards against a report that never comes.
            delivery = await asyncio.wait_for(future, self._timeouts.delivery_s + 5)
        except TimeoutError:
            delivery = Delivery(failed={s.request.id: "no delivery report" for s in submissions})
        self.metrics.records_produced(len(delivery.acknowledged))
        if delivery.only_queue_full:
            raise self._overloaded(delivery)
        if not delivery.ok:
            raise self._kafka_unavailable(delivery)
        return [s.request.id for s in submissions]

    async def predict(self, submission: Submission, *, timeout_s: float) -> Outcome | None:
        """Produce one request and wait up to ``timeout_s`` (after Kafka's acknowledgement)
        for its outcome; None when it did not come in time."""
        request_id = submission.request.id
        async with self.waiters.waiting(request_id) as outcome:
            await self.submit([submission])
            try:
                found: Outcome | None = await asyncio.wait_for(outcome, timeout_s)
            except TimeoutError:
                found = None
        if found is None:
            # A notification lost to a Redis reconnect still leaves the result in Redis.
            with contextlib.suppress(Exception):
                value = await self._redis.get(self._names.key(request_id))
                found = Stored(value) if isinstance(value, bytes) else None
        self.metrics.predict_outcome(_outcome_name(found))
        return found

    async def result(self, request_id: str) -> bytes | None:
        value = await self._redis.get(self._names.key(request_id))
        return value if isinstance(value, bytes) else None

    async def readiness(self) -> dict[str, str]:
        """``{"kafka": "ok"|why, "redis": "ok"|why}``."""
        kafka, redis_state = await asyncio.gather(self._kafka_state(), self._redis_state())
        return {"kafka": kafka, "redis": redis_state}

    async def _kafka_state(self) -> str:
        topic = self._settings.topics.requests
        try:
            metadata = await asyncio.to_thread(
                self._kafka.list_topics, topic, timeout=self._timeouts.probe_s
            )
        except Exception as exc:
            return f"unreachable: {exc}"
        found = metadata.topics.get(topic)
        if found is None or found.error is not None or not found.partitions:
            return f"topic {topic} is missing"
        return "ok"

    async def _redis_state(self) -> str:
        try:
            async with asyncio.timeout(self._timeouts.probe_s):
                await self._redis.ping()
        except Exception as exc:
            return f"unreachable: {exc!r}"
        return "ok"

    def _overloaded(self, delivery: Delivery) -> ApiError:
        """The queue filled up mid-batch: 429 like a batch refused whole, naming what Kafka
        did take, so a client can resend just the rest."""
        return ApiError(
            429,
            "overloaded",
            f"{len(delivery.failed)} record(s) did not fit the producer queue; retry them later",
            headers={"Retry-After": str(self._settings.ingest.busy_retry_after_s)},
            acknowledged=delivery.acknowledged,
            failed=sorted(delivery.failed),
        )

    def _kafka_unavailable(self, delivery: Delivery) -> ApiError:
        reasons = sorted(set(delivery.failed.values()))
        return ApiError(
            503,
            "kafka_unavailable",
            f"Kafka did not acknowledge {len(delivery.failed)} record(s): {'; '.join(reasons)}",
            headers={"Retry-After": str(self._timeouts.unavailable_retry_s)},
            acknowledged=delivery.acknowledged,
            failed=sorted(delivery.failed),
        )

    def _dlq_consumer(self) -> Consumer:
        settings = self._settings
        return make_consumer(
            settings,
            group_id=DlqWatcher.group_id(settings.kafka.topic_prefix),
            **{"partition.assignment.strategy": "range", "auto.offset.reset": "latest"},
        )


def _outcome_name(outcome: Outcome | None) -> str:
    if outcome is None:
        return "timeout"
    return "dead_lettered" if isinstance(outcome, DeadLettered) else "ok"


def build_service(settings: Settings, metrics: IngestMetrics) -> IngestService:
    """An :class:`IngestService` with its clients built from ``settings``."""
    kafka = make_producer(
        settings,
        **{
            "linger.ms": settings.ingest.linger_ms,
            "delivery.timeout.ms": int(settings.ingest.delivery_timeout_s * 1000),
            "queue.buffering.max.messages": settings.ingest.queue_max_records,
        },
    )
    registry = model_registry(settings) if settings.ingest.check_models else None
    decoder = RequestDecoder(registry=registry, max_batch=settings.ingest.max_batch_records)
    redis_client = aioredis.Redis.from_url(
        settings.redis.url.get_secret_value(),
        socket_connect_timeout=settings.ingest.probe_timeout_s,
        socket_timeout=settings.ingest.probe_timeout_s,
    )
    return IngestService(
        settings=settings,
        decoder=decoder,
        kafka=kafka,
        redis_client=redis_client,
        metrics=metrics,
    )

"""What the HTTP routes do, without HTTP: submit, predict, look up, check readiness.

:class:`IngestService` owns one process's clients, handed to it built (the wiring lives in
``streaminfer/ingest_app.py``): the Kafka producer (polled by its own thread), an asyncio
Redis client, the result waiters (one pub/sub connection) and the DLQ watcher. ``start()`` and
``close()`` run in the app's lifespan, inside the worker process.

Every call names the tenant (ingest learns it from the API key): records carry it in their
``streaminfer.tenant`` header, and results are read and awaited under that tenant only.
Failures are domain exceptions (:class:`Overloaded`, :class:`KafkaUnavailable`, ``QueueFull``,
``ResultsUnavailable``); ``ingest/errors.py`` turns them into HTTP answers.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import redis.asyncio as aioredis
from confluent_kafka import Consumer, Producer

from ingest.delivery import AsyncProducer, Delivery
from ingest.dlq_watcher import DlqWatcher
from ingest.metrics import IngestMetrics
from ingest.payloads import RequestDecoder, Submission
from ingest.waiters import DeadLettered, Outcome, ResultWaiters, Stored
from schemas.keys import ResultKeys
from stages.tracing import RequestTracer

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class ServiceConfig:
    """What the service needs to know besides its clients."""

    requests_topic: str
    dlq_topic: str
    keys: ResultKeys
    delivery_timeout_s: float  # the producer's delivery.timeout.ms, in seconds
    probe_timeout_s: float  # readiness checks, and Redis confirming a subscription
    queue_max_records: int  # the producer's queue.buffering.max.messages


class NotAcknowledged(Exception):
    """Kafka did not acknowledge every record of a batch: ``acknowledged`` ids are in Kafka,
    ``failed`` maps each other id to why (a client resends just those)."""

    def __init__(self, message: str, delivery: Delivery) -> None:
        super().__init__(message)
        self.acknowledged = list(delivery.acknowledged)
        self.failed = dict(delivery.failed)


class Overloaded(NotAcknowledged):
    """The producer's queue filled up part-way through a batch (backpressure)."""


class KafkaUnavailable(NotAcknowledged):
    """Kafka did not acknowledge some records in time, or refused them."""


class IngestService:
    """Submit requests, wait for results, look them up. Every method runs on the event loop
    and never blocks it (Kafka metadata calls go to a worker thread)."""

    def __init__(
        self,
        *,
        config: ServiceConfig,
        default_tenant: str,
        decoder: RequestDecoder,
        kafka: Producer,
        redis_client: aioredis.Redis,
        dlq_consumer: Callable[[], Consumer],
        metrics: IngestMetrics,
        tracer: RequestTracer | None = None,
    ) -> None:
        self.decoder = decoder
        self.metrics = metrics
        self._config = config
        self._default_tenant = default_tenant
        self._kafka = kafka
        self._redis = redis_client
        self._dlq_consumer = dlq_consumer
        self.producer = AsyncProducer(
            producer=kafka,
            topic=config.requests_topic,
            queue_limit=config.queue_max_records,
            tracer=tracer,
            # librdkafka reports a timeout itself after delivery.timeout.ms; the margin only
            # guards against a report that never comes.
            report_timeout_s=config.delivery_timeout_s + 5,
        )
        self.waiters = ResultWaiters(
            client=redis_client, keys=config.keys, confirm_timeout_s=config.probe_timeout_s
        )
        self._dlq: DlqWatcher | None = None
        self._reader: asyncio.Task[None] | None = None

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self.producer.start()
        self._reader = loop.create_task(self.waiters.run(), name="result-notifications")
        self._dlq = DlqWatcher(
            consumer_factory=self._dlq_consumer,
            topic=self._config.dlq_topic,
            wanted=self.waiters.is_waiting,
            notify=lambda rid, dead: self._on_loop(loop, rid, dead),
        )
        self._dlq.start()

    def _on_loop(
        self, loop: asyncio.AbstractEventLoop, request_id: str, dead: DeadLettered
    ) -> None:
        loop.call_soon_threadsafe(self._dead_lettered, request_id, dead)

    def _dead_lettered(self, request_id: str, dead: DeadLettered) -> None:
        # A dead letter without a tenant header came from a record without one: the default
        # tenant's. Only that tenant's waiters of the id hear of it.
        self.waiters.settle(dead.tenant or self._default_tenant, request_id, dead)

    async def close(self) -> None:
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader
        if self._dlq is not None:
            await asyncio.to_thread(self._dlq.stop)
        self.producer.stop_polling()
        unsent = await asyncio.to_thread(self.producer.close, self._config.delivery_timeout_s)
        if unsent:
            log.warning("%d records were not acknowledged by Kafka at shutdown", unsent)
        await self._redis.aclose()  # also closes the waiters' pub/sub connection

    async def submit(self, submissions: list[Submission], *, tenant: str) -> list[str]:
        """Produce every submission as ``tenant``'s; returns their ids once Kafka
        acknowledged all of them.

        Raises ``QueueFull`` (nothing queued), :class:`Overloaded` (the queue filled up
        part-way) or :class:`KafkaUnavailable`, both naming what Kafka did and did not take.
        """
        queued_at = time.perf_counter()
        # Settles within delivery_timeout_s + 5 s, with every id failed when no report came.
        delivery = await self.producer.send(submissions, tenant=tenant.encode())
        if delivery.ok:
            self.metrics.produce_acknowledged(time.perf_counter() - queued_at)
        self.metrics.records_produced(len(delivery.acknowledged))
        if delivery.only_queue_full:
            raise Overloaded(
                f"{len(delivery.failed)} record(s) did not fit the producer queue", delivery
            )
        if not delivery.ok:
            reasons = "; ".join(sorted(set(delivery.failed.values())))
            raise KafkaUnavailable(
                f"Kafka did not acknowledge {len(delivery.failed)} record(s): {reasons}", delivery
            )
        return [s.request.id for s in submissions]

    async def predict(
        self, submission: Submission, *, tenant: str, timeout_s: float
    ) -> Outcome | None:
        """Produce one request as ``tenant``'s and wait up to ``timeout_s`` (after Kafka's
        acknowledgement) for its outcome; None when it did not come in time."""
        request_id = submission.request.id
        async with self.waiters.waiting(tenant, request_id) as outcome:
            await self.submit([submission], tenant=tenant)
            try:
                found: Outcome | None = await asyncio.wait_for(outcome, timeout_s)
            except TimeoutError:
                found = None
        if found is None:
            # A notification lost to a Redis reconnect still leaves the result in Redis.
            with contextlib.suppress(Exception):
                value = await self._redis.get(self._config.keys.key(tenant, request_id))
                found = Stored(value) if isinstance(value, bytes) else None
        self.metrics.predict_outcome(_outcome_name(found))
        return found

    async def result(self, tenant: str, request_id: str) -> bytes | None:
        """``tenant``'s stored result of ``request_id`` (None: unknown, expired, or another
        tenant's)."""
        value = await self._redis.get(self._config.keys.key(tenant, request_id))
        return value if isinstance(value, bytes) else None

    async def readiness(self) -> dict[str, str]:
        """``{"kafka": "ok"|why, "redis": "ok"|why}``."""
        kafka, redis_state = await asyncio.gather(self._kafka_state(), self._redis_state())
        return {"kafka": kafka, "redis": redis_state}

    async def _kafka_state(self) -> str:
        topic = self._config.requests_topic
        try:
            metadata = await asyncio.to_thread(
                self._kafka.list_topics, topic, timeout=self._config.probe_timeout_s
            )
        except Exception as exc:
            return f"unreachable: {exc}"
        found = metadata.topics.get(topic)
        if found is None or found.error is not None or not found.partitions:
            return f"topic {topic} is missing"
        return "ok"

    async def _redis_state(self) -> str:
        try:
            async with asyncio.timeout(self._config.probe_timeout_s):
                await self._redis.ping()
        except Exception as exc:
            return f"unreachable: {exc!r}"
        return "ok"


def _outcome_name(outcome: Outcome | None) -> str:
    if outcome is None:
        return "timeout"
    return "dead_lettered" if isinstance(outcome, DeadLettered) else "ok"

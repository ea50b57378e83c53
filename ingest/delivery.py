"""Kafka writes awaited from asyncio: a future per batch that settles on the delivery reports.

librdkafka calls delivery callbacks from ``poll()``; a background thread polls, so the event
loop never blocks. Each batch counts its outstanding reports in that thread and crosses over
to the loop once (``call_soon_threadsafe``) when the last report arrived. The producer is
idempotent with ``acks=all``: a successful report means every in-sync replica holds the record.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field

from confluent_kafka import KafkaError, Message, Producer

from ingest.payloads import Submission
from kafkaio.produce import produce_request
from stages.tracing import RequestTracer

log = logging.getLogger(__name__)
QUEUE_FULL = "local producer queue full"  # Delivery.failed reason of records never queued


class QueueFull(Exception):
    """The producer's local queue cannot take the batch (backpressure): retry later."""


@dataclass(slots=True)
class Delivery:
    """Outcome of one batch: ids Kafka acknowledged and ids it did not (with why)."""

    acknowledged: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.failed

    @property
    def only_queue_full(self) -> bool:
        """Every failure is a record that did not fit the local queue (backpressure)."""
        return bool(self.failed) and all(why == QUEUE_FULL for why in self.failed.values())


class _PendingBatch:
    """Counts a batch's delivery reports (from the polling thread) and settles its future on
    the event loop once every record is accounted for."""

    __slots__ = ("delivery", "future", "lock", "loop", "remaining")

    def __init__(self, loop: asyncio.AbstractEventLoop, size: int) -> None:
        self.loop = loop
        self.future: asyncio.Future[Delivery] = loop.create_future()
        self.delivery = Delivery()
        self.remaining = size
        self.lock = threading.Lock()

    def report(self, request_id: str, err: KafkaError | None) -> None:
        with self.lock:
            if err is None:
                self.delivery.acknowledged.append(request_id)
            else:
                self.delivery.failed[request_id] = err.str()
            self._account(1)

    def not_queued(self, request_ids: Sequence[str], why: str) -> None:
        with self.lock:
            for request_id in request_ids:
                self.delivery.failed[request_id] = why
            self._account(len(request_ids))

    def _account(self, count: int) -> None:
        self.remaining -= count
        if self.remaining == 0:
            self.loop.call_soon_threadsafe(_settle, self.future, self.delivery)


def _settle(future: asyncio.Future[Delivery], delivery: Delivery) -> None:
    if not future.done():  # the waiter may have given up (cancelled)
        future.set_result(delivery)


class AsyncProducer:
    """Produces request batches and hands back a future of their :class:`Delivery`.

    ``queue_limit`` mirrors ``queue.buffering.max.messages``: a batch that would not fit is
    refused whole (:class:`QueueFull`) before any record of it is queued. With a ``tracer``,
    each record's trace starts here: a root span from produce to Kafka's acknowledgement,
    whose context is the record's ``traceparent``.
    """

    def __init__(
        self,
        *,
        producer: Producer,
        topic: str,
        queue_limit: int,
        tracer: RequestTracer | None = None,
    ) -> None:
        self._producer = producer
        self._topic = topic
        self._queue_limit = queue_limit
        self._tracer = tracer
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, name="kafka-poll", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def queue_depth(self) -> int:
        """Records queued or in flight (not yet acknowledged)."""
        return len(self._producer)

    def send(
        self, batch: Sequence[Submission], *, tenant: bytes | None = None
    ) -> asyncio.Future[Delivery]:
        """Queue every record of ``batch`` (call on the event loop); never blocks. ``tenant``
        goes into every record's tenant header."""
        if self.queue_depth() + len(batch) > self._queue_limit:
            raise QueueFull(f"producer queue holds {self.queue_depth()} records")
        pending = _PendingBatch(asyncio.get_running_loop(), len(batch))
        for index, submission in enumerate(batch):
            try:
                self._produce(submission, pending, tenant)
            except BufferError:
                if index == 0:
                    raise QueueFull("producer queue is full") from None
                # Over the byte limit mid-batch: the queued part is reported as usual and the
                # rest as failed, so the caller still learns exactly what Kafka holds.
                rest = [s.request.id for s in batch[index:]]
                pending.not_queued(rest, QUEUE_FULL)
                break
        return pending.future

    def _produce(
        self, submission: Submission, pending: _PendingBatch, tenant: bytes | None
    ) -> None:
        request_id = submission.request.id
        span = self._tracer.start(request_id, topic=self._topic) if self._tracer else None

        def on_delivery(err: KafkaError | None, _msg: Message) -> None:
            if span is not None:
                span.end(None if err is None else err.str())
            pending.report(request_id, err)

        # No waiting for room: send() turns a full queue into backpressure (429) itself.
        try:
            produce_request(
                self._producer,
                self._topic,
                value=submission.value,
                key=submission.partition_key.encode(),
                on_delivery=on_delivery,
                tenant=tenant,
                wait_for_room=False,
                traceparent=span.traceparent if span is not None else None,
            )
        except Exception as exc:  # not queued (a full queue, a refused record): no ack to wait for
            if span is not None:
                span.end(f"not queued: {type(exc).__name__}")
            raise

    def _poll(self) -> None:
        while not self._stop.is_set():
            self._producer.poll(0.1)

    def close(self, timeout_s: float) -> int:
        """Stop polling and flush; returns the records still not acknowledged."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()
        return self._producer.flush(timeout_s)

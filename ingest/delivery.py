"""Kafka writes awaited from asyncio: a future per batch that settles on the delivery reports.

librdkafka calls delivery callbacks from ``poll()``. The event loop polls (``poll(0)``, which
never blocks) on a short timer while any batch is unsettled, and not at all when none is: the
callbacks then run on the loop itself and settle a batch's future directly. A polling thread
(the previous design) cost a thread wake-up, a GIL hand-over and a ``call_soon_threadsafe``
self-pipe write per acknowledged batch, more CPU than the rest of a single-request POST's
produce path. The timer adds at most ``poll_interval_s`` to the acknowledgement.

The same tick gives up on a batch whose reports did not all come within
``report_timeout_s`` (librdkafka reports a timeout itself after ``delivery.timeout.ms``; this
only guards against a report that never comes): every id of it then fails with ``no delivery
report``. The producer is idempotent with ``acks=all``: a successful report means every
in-sync replica holds the record.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import partial

from confluent_kafka import KafkaError, Message, Producer

from ingest.payloads import Submission
from kafkaio.produce import DeliveryCallback, produce_request
from stages.tracing import RequestTracer

log = logging.getLogger(__name__)
QUEUE_FULL = "local producer queue full"  # Delivery.failed reason of records never queued
NO_REPORT = "no delivery report"  # Delivery.failed reason when the reports did not come


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
    """Counts a batch's delivery reports and settles its future once every record is
    accounted for (or its time is up)."""

    __slots__ = ("deadline", "delivery", "future", "ids", "loop", "remaining", "thread")

    def __init__(self, loop: asyncio.AbstractEventLoop, ids: list[str], deadline: float) -> None:
        self.loop = loop
        self.future: asyncio.Future[Delivery] = loop.create_future()
        self.delivery = Delivery()
        self.ids = ids
        self.remaining = len(ids)
        self.deadline = deadline
        self.thread = threading.get_ident()  # the loop's: send() runs on it

    def report(self, request_id: str, err: KafkaError | None, _msg: Message | None) -> None:
        if err is None:
            self.delivery.acknowledged.append(request_id)
        else:
            self.delivery.failed[request_id] = err.str()
        self.remaining -= 1
        if self.remaining == 0:
            self._settle(self.delivery)

    def not_queued(self, request_ids: Sequence[str], why: str) -> None:
        for request_id in request_ids:
            self.delivery.failed[request_id] = why
        self.remaining -= len(request_ids)
        if self.remaining == 0:
            self._settle(self.delivery)

    def expire(self) -> None:
        """No word from Kafka in time: the whole batch counts as not acknowledged."""
        self.remaining = 0
        self._settle(Delivery(failed=dict.fromkeys(self.ids, NO_REPORT)))

    def _settle(self, delivery: Delivery) -> None:
        if self.thread == threading.get_ident():
            _settle(self.future, delivery)
        elif not self.loop.is_closed():  # reports served by close()'s flush, in a thread
            self.loop.call_soon_threadsafe(_settle, self.future, delivery)


def _settle(future: asyncio.Future[Delivery], delivery: Delivery) -> None:
    if not future.done():  # the waiter may have given up (cancelled)
        future.set_result(delivery)


class AsyncProducer:
    """Produces request batches and hands back a future of their :class:`Delivery`.

    ``queue_limit`` mirrors ``queue.buffering.max.messages``: a batch that would not fit is
    refused whole (:class:`QueueFull`) before any record of it is queued. With a ``tracer``,
    each record's trace starts here: a root span from produce to Kafka's acknowledgement,
    whose context is the record's ``traceparent``. Delivery reports are served by the event
    loop of :meth:`send` (see the module docstring).
    """

    def __init__(
        self,
        *,
        producer: Producer,
        topic: str,
        queue_limit: int,
        tracer: RequestTracer | None = None,
        report_timeout_s: float = 60.0,
        poll_interval_s: float = 0.001,
    ) -> None:
        self._producer = producer
        self._topic = topic
        self._queue_limit = queue_limit
        self._tracer = tracer
        self._report_timeout_s = report_timeout_s
        self._interval_s = poll_interval_s
        self._unsettled: collections.deque[_PendingBatch] = collections.deque()  # oldest first
        self._timer: asyncio.TimerHandle | None = None
        self._polled_by: asyncio.AbstractEventLoop | None = None
        self._closed = False

    def start(self) -> None:
        """Nothing to start: polling runs on the loop of :meth:`send` while it is needed."""

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
        loop = asyncio.get_running_loop()
        ids = [s.request.id for s in batch]
        pending = _PendingBatch(loop, ids, time.monotonic() + self._report_timeout_s)
        for index, submission in enumerate(batch):
            try:
                self._produce(submission, pending, tenant)
            except BufferError:
                if index == 0:
                    raise QueueFull("producer queue is full") from None
                # Over the byte limit mid-batch: the queued part is reported as usual and the
                # rest as failed, so the caller still learns exactly what Kafka holds.
                pending.not_queued(ids[index:], QUEUE_FULL)
                break
            except Exception as exc:
                if index:  # the records already queued still get their reports served
                    pending.not_queued(ids[index:], f"not queued: {exc}")
                    self._watch(pending, loop)
                raise
        self._watch(pending, loop)
        return pending.future

    def _watch(self, pending: _PendingBatch, loop: asyncio.AbstractEventLoop) -> None:
        self._unsettled.append(pending)
        if self._timer is None or self._polled_by is not loop:  # a new loop: poll on it
            self._polled_by = loop
            self._timer = loop.call_later(self._interval_s, self._tick, loop)

    def _produce(
        self, submission: Submission, pending: _PendingBatch, tenant: bytes | None
    ) -> None:
        request_id = submission.request.id
        on_delivery: DeliveryCallback
        if self._tracer is None:
            on_delivery = partial(pending.report, request_id)
            traceparent = None
        else:
            span = self._tracer.start(request_id, topic=self._topic)
            traceparent = span.traceparent

            def on_delivery(err: KafkaError | None, msg: Message) -> None:
                span.end(None if err is None else err.str())
                pending.report(request_id, err, msg)

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
                traceparent=traceparent,
            )
        except Exception as exc:  # not queued (a full queue, a refused record): no ack to wait for
            if self._tracer is not None:
                span.end(f"not queued: {type(exc).__name__}")
            raise

    def _tick(self, loop: asyncio.AbstractEventLoop) -> None:
        """Serve the delivery reports that came, give up on batches past their time, and
        come back while any batch is unsettled."""
        self._timer = None
        if self._closed or loop is not self._polled_by:
            return
        self._producer.poll(0)
        unsettled = self._unsettled
        now = time.monotonic()
        while unsettled and (unsettled[0].remaining == 0 or unsettled[0].deadline < now):
            oldest = unsettled.popleft()
            if oldest.remaining:
                oldest.expire()
        if unsettled:
            self._timer = loop.call_later(self._interval_s, self._tick, loop)

    def stop_polling(self) -> None:
        """Stop the loop's polling (call on the loop, before :meth:`close` in a thread)."""
        self._closed = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def close(self, timeout_s: float) -> int:
        """Stop polling and flush (serving the last reports, from the calling thread);
        returns the records still not acknowledged."""
        self._closed = True
        return self._producer.flush(timeout_s)

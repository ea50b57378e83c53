"""How a batch's outputs and offsets become durable: the processing guarantee.

:class:`AtLeastOnceCommitter` produces, waits for every delivery report, then commits the
consumer offsets: a crash in between replays the batch (duplicates possible, no loss). With
``commit_async`` that commit is sent without waiting for its answer (the outputs are already
acknowledged, so a lost commit only replays); ``commit()`` (revoke, pause) and ``close()``
commit the latest offsets synchronously.

:class:`TransactionalCommitter` (exactly-once between Kafka stages) produces inside a Kafka
transaction and adds the consumer offsets to it (``send_offsets_to_transaction`` with the
consumer's current group metadata), so outputs and offsets commit or abort together;
``read_committed`` readers never see aborted outputs. One transaction spans batches until a
size or time cadence is due, or (``commit_on_drain``) the batch drained the input. A commit
first waits for the outputs' acknowledgements, then adds the offsets and ends the
transaction (see :meth:`TransactionalCommitter.commit` for why). Its ``transactional.id`` is
stable per worker slot, so a restarted worker fences its zombie and aborts the zombie's open
transaction at once. Error handling follows librdkafka's ``examples/transactions.c``:
retriable -> retry; abortable (``txn_requires_abort``) -> abort and raise
:class:`TransactionAborted` so the runtime rewinds to the committed offsets; fatal or fenced
-> recreate the producer, then the same.

Neither loops forever on a record the producer refuses for its size (the runtime checks
sizes before, with an estimate; this is the safety net): :func:`produce` raises
:class:`OutputTooLarge`, so does a delivery report that says so, and the runtime then
dead-letters the record instead of retrying it. Only failed deliveries need reporting:
the stages' producers set ``delivery.report.only.error`` (streaminfer.kafka).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Final, Protocol

from confluent_kafka import Consumer, KafkaError, KafkaException, Message, Producer, TopicPartition

from kafkaio.produce import QueueStuck, RecordTooLarge, is_too_large, produce_waiting
from stages.errors import DeliveryFailed, OutputTooLarge, TransactionAborted
from stages.metrics import NullMetrics, StageMetrics
from stages.records import HeaderList, Output, wire_size
from stages.tracing import NO_TRACING, StageTracer

log = logging.getLogger(__name__)
DeliveryCallback = Callable[[KafkaError | None, Message], None]
EXIT_STUCK: Final = 75  # EX_TEMPFAIL: restart me
# A commit (flush, send_offsets, commit_transaction retried up to twice its timeout) gets this
# many transactional timeouts before the watchdog ends the process.
WATCHDOG_TIMEOUTS: Final = 4


@contextmanager
def _watchdog(limit_s: float) -> Iterator[None]:
    """Exit the process if the block does not finish within ``limit_s``.

    librdkafka can block in ``send_offsets_to_transaction`` past its timeout when the group
    coordinator went away, e.g. after a single broker restarts (librdkafka issues #5456 and
    #5511). A C call cannot be interrupted, and a stage stuck there holds its partitions and
    an open transaction forever; exiting lets the supervisor (compose/k8s restart policy,
    ``streaminfer up``) start a fresh worker, whose ``init_transactions`` fences this one and
    aborts its transaction, so nothing is lost or doubled.
    """

    def expire() -> None:
        log.critical(
            "a transactional call blocked for %.0fs (librdkafka #5456/#5511); exiting so "
            "that a restarted worker takes over",
            limit_s,
        )
        os._exit(EXIT_STUCK)

    timer = threading.Timer(limit_s, expire)
    timer.daemon = True
    timer.start()
    try:
        yield
    finally:
        timer.cancel()


class Committer(Protocol):
    """Publishes a batch's outputs and commits its offsets, as one step of the guarantee."""

    def publish(
        self,
        outputs: Sequence[Output],
        offsets: Sequence[TopicPartition],
        *,
        drained: bool = False,
    ) -> None:
        """Hand over one batch. ``drained``: the consumer returned fewer records than asked
        for, so nothing more is waiting (a good moment to commit). Raises
        :class:`DeliveryFailed` (at-least-once: nothing of this batch committed) or
        :class:`TransactionAborted` (exactly-once: everything since the last commit
        discarded; rewind to the committed offsets). Either raises :class:`OutputTooLarge`
        (a TransactionAborted: rewind) for an output the producer refused for its size."""
        ...

    def commit(self) -> None:
        """Make everything published so far durable now (before a rebalance or a pause)."""
        ...

    def commit_due_in(self) -> float | None:
        """Seconds until a pending commit is due (None: nothing pending)."""
        ...

    def abort(self) -> None:
        """Discard what was published but not committed (partitions were lost)."""
        ...

    def close(self) -> None: ...


def produce(
    producer: Producer,
    output: Output,
    on_delivery: DeliveryCallback | None,
    *,
    queue_timeout_s: float = 30.0,
) -> None:
    """``producer.produce`` that waits for room when the local queue is full.

    Raises :class:`OutputTooLarge` when the producer refuses ``output`` for its size (or the
    queue cannot hold it even empty), :class:`DeliveryFailed` when the queue stays full for
    ``queue_timeout_s`` (nothing is being delivered).
    """
    try:
        produce_waiting(
            producer,
            output.topic,
            value=output.value,
            key=output.key,
            headers=list(output.headers),
            on_delivery=on_delivery,
            queue_timeout_s=queue_timeout_s,
        )
    except RecordTooLarge as exc:
        size = wire_size(output)
        raise OutputTooLarge(f"{size} bytes: {exc}", size=size) from exc
    except QueueStuck as exc:
        raise DeliveryFailed(str(exc)) from exc


def _message_size(msg: Message) -> int:
    """Our estimate of a refused record's size (without headers if they cannot be read)."""
    try:
        raw = msg.headers() or []
    except Exception:  # header names that are not UTF-8: their few bytes are left out
        raw = []
    pairs = list(raw.items()) if isinstance(raw, dict) else raw
    headers: HeaderList = [(str(pair[0]), pair[1]) for pair in pairs]
    output = Output(topic="", key=msg.key(), value=msg.value() or b"", headers=headers)
    return wire_size(output)


class AtLeastOnceCommitter:
    """Produce, wait for every delivery report, then commit offsets (synchronously, or
    with ``commit_async`` without waiting for the answer)."""

    def __init__(
        self,
        *,
        producer: Producer,
        consumer: Consumer,
        delivery_timeout_s: float,
        commit_async: bool = False,
        tracer: StageTracer = NO_TRACING,
    ) -> None:
        self._producer = producer
        self._consumer = consumer
        self._delivery_timeout_s = delivery_timeout_s
        self._commit_async = commit_async
        self._tracer = tracer
        # Asynchronous mode: the latest offsets handed to an asynchronous commit, per
        # partition; commit() commits them synchronously (revoke, pause, close).
        self._uncertain: dict[tuple[str, int], int] = {}

    def publish(
        self,
        outputs: Sequence[Output],
        offsets: Sequence[TopicPartition],
        *,
        drained: bool = False,
    ) -> None:
        failures: list[str] = []
        refused: list[int] = []  # sizes of records the broker refused as too large

        def on_delivery(err: KafkaError | None, msg: Message) -> None:
            if is_too_large(err):
                refused.append(_message_size(msg))
            elif err is not None:
                failures.append(str(err))

        for output in outputs:
            produce(self._producer, output, on_delivery, queue_timeout_s=self._delivery_timeout_s)
        remaining = self._producer.flush(self._delivery_timeout_s)
        if refused:
            raise OutputTooLarge(f"the broker refused {max(refused)} bytes", size=max(refused))
        if remaining or failures:
            detail = failures[0] if failures else f"{remaining} records not acknowledged"
            raise DeliveryFailed(f"{len(failures) + remaining} outputs not delivered: {detail}")
        if not offsets:
            return
        if self._commit_async:
            # The outputs are acknowledged; the commit goes out without waiting for its
            # answer (the next batch does not wait a round trip). A lost answer costs at
            # most a replay, as a failed synchronous commit does; commit() makes sure.
            self._uncertain.update({(tp.topic, tp.partition): tp.offset for tp in offsets})
        self._commit_offsets(list(offsets), asynchronous=self._commit_async)

    def _commit_offsets(self, offsets: list[TopicPartition], *, asynchronous: bool) -> None:
        try:
            with self._tracer.step("commit"):
                # Two calls: the client's overloads take the literal, not a bool.
                if asynchronous:
                    self._consumer.commit(offsets=offsets, asynchronous=True)
                else:
                    self._consumer.commit(offsets=offsets, asynchronous=False)
        except KafkaException as exc:
            # e.g. ILLEGAL_GENERATION mid-rebalance. The outputs are delivered, so nothing
            # is lost: whoever owns the partition next replays from the last commit.
            log.warning("offset commit failed (%s); records may be redelivered", exc.args[0])

    def commit(self) -> None:
        """Synchronously commit the offsets that asynchronous commits carried (a no-op
        in synchronous mode: every publish already committed)."""
        if self._uncertain:
            offsets = [TopicPartition(t, p, o) for (t, p), o in self._uncertain.items()]
            self._uncertain.clear()
            self._commit_offsets(offsets, asynchronous=False)

    def commit_due_in(self) -> float | None:
        return None

    def abort(self) -> None:
        # Partitions were lost: their offsets are not ours to commit any more. (Dropping the
        # others' too costs at most a replay; their next batch commits them again.)
        self._uncertain.clear()

    def close(self) -> None:
        self._producer.flush(self._delivery_timeout_s)
        self.commit()


class TransactionalCommitter:
    """Exactly-once publishing; see the module docstring."""

    def __init__(
        self,
        *,
        producer_factory: Callable[[], Producer],
        consumer: Consumer,
        max_records: int,
        max_interval_s: float,
        timeout_s: float,
        commit_on_drain: bool = False,
        metrics: StageMetrics | None = None,
        tracer: StageTracer = NO_TRACING,
    ) -> None:
        self._factory = producer_factory
        self._commit_on_drain = commit_on_drain
        self._tracer = tracer
        self._metrics: StageMetrics = metrics or NullMetrics()
        self._consumer = consumer
        self._max_records = max_records
        self._max_interval_s = max_interval_s
        self._timeout_s = timeout_s
        self._producer = self._new_producer()
        self._open = False
        self._opened_at = 0.0
        self._records = 0
        self._offsets: dict[tuple[str, int], int] = {}
        self._refused: list[int] = []  # sizes the broker refused in the open transaction

    def publish(
        self,
        outputs: Sequence[Output],
        offsets: Sequence[TopicPartition],
        *,
        drained: bool = False,
    ) -> None:
        try:
            if not self._open:
                self._producer.begin_transaction()
                self._open, self._opened_at, self._records = True, time.monotonic(), 0
            for output in outputs:
                produce(self._producer, output, self._on_delivery, queue_timeout_s=self._timeout_s)
        except (KafkaException, OutputTooLarge, DeliveryFailed) as exc:
            self._fail(exc)
        for tp in offsets:
            self._offsets[(tp.topic, tp.partition)] = tp.offset
        self._records += len(outputs)
        if (
            self._records >= self._max_records
            or (drained and self._commit_on_drain)
            or self.commit_due_in() == 0.0
        ):
            self.commit()

    def commit_due_in(self) -> float | None:
        if not self._open:
            return None
        return max(0.0, self._opened_at + self._max_interval_s - time.monotonic())

    def commit(self) -> None:
        """Flush (every output acknowledged), add the offsets, commit the transaction."""
        if not self._open:
            return
        offsets = [TopicPartition(t, p, o) for (t, p), o in self._offsets.items()]
        started = time.monotonic()
        try:
            with self._tracer.step("commit"), _watchdog(WATCHDOG_TIMEOUTS * self._timeout_s):
                if offsets:
                    # Outputs acknowledged first: their partitions are then in the transaction,
                    # so AddOffsetsToTxn cannot race an AddPartitionsToTxn still in flight (the
                    # coordinator answers CONCURRENT_TRANSACTIONS and librdkafka retries after
                    # retry.backoff.ms, 100 ms, doubling). commit_transaction flushes anyway.
                    self._producer.flush(self._timeout_s)
                    metadata = self._consumer.consumer_group_metadata()
                    self._producer.send_offsets_to_transaction(offsets, metadata, self._timeout_s)
                self._commit_transaction()
        except KafkaException as exc:
            self._fail(exc)
        self._reset()
        self._metrics.transaction_committed(time.monotonic() - started)

    def _commit_transaction(self) -> None:
        deadline = time.monotonic() + self._timeout_s
        while True:
            try:
                self._producer.commit_transaction(self._timeout_s)
                return
            except KafkaException as exc:
                error: KafkaError = exc.args[0]
                if not error.retriable() or time.monotonic() > deadline:
                    raise
                log.warning("commit_transaction: %s; retrying", error)

    def abort(self) -> None:
        if not self._open:
            return
        self._metrics.transaction_aborted()
        try:
            self._producer.abort_transaction(self._timeout_s)
        except KafkaException as exc:
            log.warning("abort_transaction failed (%s); recreating the producer", exc.args[0])
            self._producer = self._new_producer()
        self._reset()

    def close(self) -> None:
        try:
            self.commit()
        except TransactionAborted:  # OutputTooLarge included
            log.warning("final commit aborted; the next owner reprocesses from committed offsets")

    def _on_delivery(self, err: KafkaError | None, msg: Message) -> None:
        # Any failed delivery makes the transaction abortable; this notes which were refused
        # for their size, so that the abort says so (and the runtime stops retrying them).
        if is_too_large(err):
            self._refused.append(_message_size(msg))

    def _fail(self, exc: KafkaException | OutputTooLarge | DeliveryFailed) -> None:
        """Abort (or, when fatal, recreate the producer) and raise TransactionAborted (its
        subclass OutputTooLarge when a record was refused for its size)."""
        refused = max(self._refused, default=0)
        if isinstance(exc, KafkaException) and not exc.args[0].txn_requires_abort():
            log.error("producer failed fatally (%s); recreating it", exc.args[0])
            self._metrics.transaction_aborted()  # the open transaction dies with the producer
            self._producer = self._new_producer()
            self._reset()
        else:
            log.warning("transaction must abort: %s", exc.args[0])
            self.abort()
        if isinstance(exc, OutputTooLarge):
            raise exc
        if refused:
            raise OutputTooLarge(f"the broker refused {refused} bytes", size=refused) from exc
        raise TransactionAborted(str(exc.args[0])) from exc

    def _reset(self) -> None:
        self._open = False
        self._records = 0
        self._offsets.clear()
        self._refused.clear()

    def _new_producer(self) -> Producer:
        """A producer with our transactional.id; ``init_transactions`` fences any zombie
        with the same id and aborts its open transaction."""
        producer = self._factory()
        deadline = time.monotonic() + 4 * self._timeout_s
        while True:
            try:
                producer.init_transactions(self._timeout_s)
                return producer
            except KafkaException as exc:
                if not exc.args[0].retriable() or time.monotonic() > deadline:
                    raise
                log.warning("init_transactions: %s; retrying", exc.args[0])

"""How a batch's outputs and offsets become durable: the processing guarantee.

:class:`AtLeastOnceCommitter` produces, waits for every delivery report, then commits the
consumer offsets: a crash in between replays the batch (duplicates possible, no loss).

:class:`TransactionalCommitter` (exactly-once between Kafka stages) produces inside a Kafka
transaction and adds the consumer offsets to it (``send_offsets_to_transaction`` with the
consumer's current group metadata), so outputs and offsets commit or abort together;
``read_committed`` readers never see aborted outputs. One transaction spans batches until a
size or time cadence is due. Its ``transactional.id`` is stable per worker slot, so a
restarted worker fences its zombie and aborts the zombie's open transaction at once. Error
handling follows librdkafka's ``examples/transactions.c``: retriable -> retry; abortable
(``txn_requires_abort``) -> abort and raise :class:`TransactionAborted` so the runtime
rewinds to the committed offsets; fatal or fenced -> recreate the producer, then the same.
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

from stages.errors import DeliveryFailed, TransactionAborted
from stages.records import Output

log = logging.getLogger(__name__)
DeliveryCallback = Callable[[KafkaError | None, Message], None]
EXIT_STUCK: Final = 75  # EX_TEMPFAIL: restart me


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

    def publish(self, outputs: Sequence[Output], offsets: Sequence[TopicPartition]) -> None:
        """Hand over one batch. Raises :class:`DeliveryFailed` (at-least-once: nothing of
        this batch committed) or :class:`TransactionAborted` (exactly-once: everything since
        the last commit discarded; rewind to the committed offsets)."""
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


def produce(producer: Producer, output: Output, on_delivery: DeliveryCallback | None) -> None:
    """``producer.produce`` that waits for room when the local queue is full."""
    while True:
        try:
            producer.produce(
                output.topic,
                value=output.value,
                key=output.key,
                headers=list(output.headers),
                on_delivery=on_delivery,
            )
            return
        except BufferError:
            # Local queue full: serve delivery reports to make room, then try again.
            producer.poll(0.05)


class AtLeastOnceCommitter:
    """Produce, wait for every delivery report, then commit offsets synchronously."""

    def __init__(
        self, *, producer: Producer, consumer: Consumer, delivery_timeout_s: float
    ) -> None:
        self._producer = producer
        self._consumer = consumer
        self._delivery_timeout_s = delivery_timeout_s

    def publish(self, outputs: Sequence[Output], offsets: Sequence[TopicPartition]) -> None:
        failures: list[str] = []

        def on_delivery(err: KafkaError | None, _msg: Message) -> None:
            if err is not None:
                failures.append(str(err))

        for output in outputs:
            produce(self._producer, output, on_delivery)
        remaining = self._producer.flush(self._delivery_timeout_s)
        if remaining or failures:
            detail = failures[0] if failures else f"{remaining} records not acknowledged"
            raise DeliveryFailed(f"{len(failures) + remaining} outputs not delivered: {detail}")
        if offsets:
            try:
                self._consumer.commit(offsets=list(offsets), asynchronous=False)
            except KafkaException as exc:
                # e.g. ILLEGAL_GENERATION mid-rebalance. The outputs are delivered, so nothing
                # is lost: whoever owns the partition next replays from the last commit.
                log.warning("offset commit failed (%s); records may be redelivered", exc.args[0])

    def commit(self) -> None:
        pass  # every publish already committed

    def commit_due_in(self) -> float | None:
        return None

    def abort(self) -> None:
        pass

    def close(self) -> None:
        self._producer.flush(self._delivery_timeout_s)


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
    ) -> None:
        self._factory = producer_factory
        self._consumer = consumer
        self._max_records = max_records
        self._max_interval_s = max_interval_s
        self._timeout_s = timeout_s
        self._producer = self._new_producer()
        self._open = False
        self._opened_at = 0.0
        self._records = 0
        self._offsets: dict[tuple[str, int], int] = {}

    def publish(self, outputs: Sequence[Output], offsets: Sequence[TopicPartition]) -> None:
        try:
            if not self._open:
                self._producer.begin_transaction()
                self._open, self._opened_at, self._records = True, time.monotonic(), 0
            for output in outputs:
                produce(self._producer, output, None)
        except KafkaException as exc:
            self._fail(exc)
        for tp in offsets:
            self._offsets[(tp.topic, tp.partition)] = tp.offset
        self._records += len(outputs)
        if self._records >= self._max_records or self.commit_due_in() == 0.0:
            self.commit()

    def commit_due_in(self) -> float | None:
        if not self._open:
            return None
        return max(0.0, self._opened_at + self._max_interval_s - time.monotonic())

    def commit(self) -> None:
        if not self._open:
            return
        offsets = [TopicPartition(t, p, o) for (t, p), o in self._offsets.items()]
        try:
            with _watchdog(3 * self._timeout_s):
                if offsets:
                    metadata = self._consumer.consumer_group_metadata()
                    self._producer.send_offsets_to_transaction(offsets, metadata, self._timeout_s)
                self._commit_transaction()
        except KafkaException as exc:
            self._fail(exc)
        self._reset()

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
        try:
            self._producer.abort_transaction(self._timeout_s)
        except KafkaException as exc:
            log.warning("abort_transaction failed (%s); recreating the producer", exc.args[0])
            self._producer = self._new_producer()
        self._reset()

    def close(self) -> None:
        try:
            self.commit()
        except TransactionAborted:
            log.warning("final commit aborted; the next owner reprocesses from committed offsets")

    def _fail(self, exc: KafkaException) -> None:
        """Abort (or, when fatal, recreate the producer) and raise TransactionAborted."""
        error: KafkaError = exc.args[0]
        if error.txn_requires_abort():
            log.warning("transaction must abort: %s", error)
            self.abort()
        else:
            log.error("producer failed fatally (%s); recreating it", error)
            self._producer = self._new_producer()
            self._reset()
        raise TransactionAborted(str(error)) from exc

    def _reset(self) -> None:
        self._open = False
        self._records = 0
        self._offsets.clear()

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

"""The stage runtime: consume a batch -> transform -> produce -> commit.

Contract
--------
A :class:`Stage` turns a batch of consumed :class:`Record` s into a :class:`BatchOutcome`:
outputs to produce and rejections to dead-letter. It sees the whole batch at once so it can
vectorise (the infer stage runs one ``session.run`` per model per batch). It signals:

* a bad record by listing it in ``rejected`` (or, from per-record code, by raising
  :class:`InvalidRecord`, which the stage catches);
* a transient downstream failure by raising :class:`SinkUnavailable`: the runtime rewinds
  the batch and retries it later, dead-lettering nothing.

Any other exception from ``process`` is a bug or a poison record the stage did not foresee.
The runtime then replays the batch one record at a time, so the record that raises is
dead-lettered (reason ``stage_error``) and every other record still flows.

Guarantee
---------
A :class:`Committer` publishes the outputs and commits the batch's offsets. The one here,
:class:`AtLeastOnceCommitter`, produces everything, waits for every delivery report, and only
then commits offsets synchronously: a crash in between replays the batch (at-least-once).
A transactional committer (exactly-once) fits the same seam.

Offsets are committed after every batch, before the next ``consume``; rebalance callbacks
only run inside ``consume``, so a revoked partition never has uncommitted work in hand.
Shutdown (``stop`` set, e.g. by SIGTERM) finishes the batch in hand, commits, and closes
the consumer, which leaves the group at once.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from typing import Protocol

from confluent_kafka import Consumer, KafkaError, Message, Producer, TopicPartition

from schemas import Headers
from stages.errors import DeliveryFailed, SinkUnavailable
from stages.metrics import NullMetrics, StageMetrics
from stages.records import BatchOutcome, HeaderList, Output, Record, Rejection

log = logging.getLogger(__name__)
DeliveryCallback = Callable[[KafkaError | None, Message], None]


class Stage(Protocol):
    """One pipeline step. Implementations: ``stages.validate``, ``stages.infer``,
    ``stages.persist``."""

    name: str

    def process(self, batch: Sequence[Record]) -> BatchOutcome:
        """Transform ``batch`` (never empty). See the module docstring for the contract."""
        ...


class Committer(Protocol):
    """Publishes a batch's outputs and commits its offsets, as one step of the guarantee."""

    def publish(self, outputs: Sequence[Output], offsets: Sequence[TopicPartition]) -> None:
        """Raises :class:`DeliveryFailed` when outputs were not all acknowledged (then the
        offsets are not committed)."""
        ...

    def close(self) -> None: ...


def to_record(message: Message) -> Record:
    raw = message.headers() or []
    pairs = list(raw.items()) if isinstance(raw, dict) else raw
    return Record(
        topic=message.topic() or "",
        partition=message.partition() or 0,
        offset=message.offset() or 0,
        key=message.key(),
        value=message.value() or b"",
        headers=tuple((k, _header_bytes(v)) for k, v in pairs),
        timestamp_ms=message.timestamp()[1],
    )


def _header_bytes(value: str | bytes | None) -> bytes:
    if value is None:
        return b""
    return value.encode() if isinstance(value, str) else value


def dlq_output(rejection: Rejection, *, stage: str, dlq_topic: str) -> Output:
    """The rejected record's original key, value and headers, plus the ``dlq.*`` headers."""
    record = rejection.record
    headers: HeaderList = [
        *record.headers,
        (Headers.DLQ_STAGE, stage.encode()),
        (Headers.DLQ_REASON, rejection.reason.encode()),
        (Headers.DLQ_ERROR, rejection.detail[:4000].encode()),
        (Headers.DLQ_SOURCE_TOPIC, record.topic.encode()),
        (Headers.DLQ_SOURCE_PARTITION, str(record.partition).encode()),
        (Headers.DLQ_SOURCE_OFFSET, str(record.offset).encode()),
    ]
    return Output(topic=dlq_topic, key=record.key, value=record.value, headers=headers)


def next_offsets(batch: Sequence[Record]) -> list[TopicPartition]:
    """Per partition, the offset after the last record of ``batch`` (what to commit)."""
    last: dict[tuple[str, int], int] = {}
    for record in batch:
        key = (record.topic, record.partition)
        last[key] = max(last.get(key, -1), record.offset)
    return [TopicPartition(t, p, o + 1) for (t, p), o in last.items()]


def first_offsets(batch: Sequence[Record]) -> list[TopicPartition]:
    """Per partition, the offset of the first record of ``batch`` (where to rewind)."""
    first: dict[tuple[str, int], int] = {}
    for record in batch:
        key = (record.topic, record.partition)
        first[key] = min(first.get(key, record.offset), record.offset)
    return [TopicPartition(t, p, o) for (t, p), o in first.items()]


def process_isolating(stage: Stage, batch: Sequence[Record]) -> BatchOutcome:
    """``stage.process(batch)``; if it raises anything but :class:`SinkUnavailable`, replay
    the batch one record at a time so only the records that raise are dead-lettered."""
    try:
        return stage.process(batch)
    except SinkUnavailable:
        raise
    except Exception:
        log.exception("%s: batch of %d raised; isolating records", stage.name, len(batch))
    outcome = BatchOutcome.empty()
    for record in batch:
        try:
            outcome.extend(stage.process([record]))
        except SinkUnavailable:
            raise
        except Exception as exc:
            detail = f"{type(exc).__name__}: {exc}"
            outcome.rejected.append(Rejection(record, "stage_error", detail))
    return outcome


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
            self._produce(output, on_delivery)
        remaining = self._producer.flush(self._delivery_timeout_s)
        if remaining or failures:
            detail = failures[0] if failures else f"{remaining} records not acknowledged"
            raise DeliveryFailed(f"{len(failures) + remaining} outputs not delivered: {detail}")
        if offsets:
            self._consumer.commit(offsets=list(offsets), asynchronous=False)

    def _produce(
        self, output: Output, on_delivery: Callable[[KafkaError | None, Message], None]
    ) -> None:
        while True:
            try:
                self._producer.produce(
                    output.topic,
                    value=output.value,
                    key=output.key,
                    headers=list(output.headers),
                    on_delivery=on_delivery,
                )
                return
            except BufferError:
                # Local queue full: serve delivery reports to make room, then try again.
                self._producer.poll(0.05)

    def close(self) -> None:
        self._producer.flush(self._delivery_timeout_s)


class StageRunner:
    """Runs one stage as one consumer-group member. See the module docstring."""

    def __init__(
        self,
        *,
        stage: Stage,
        consumer: Consumer,
        committer: Committer,
        input_topics: Sequence[str],
        dlq_topic: str,
        batch_size: int,
        batch_timeout_s: float,
        metrics: StageMetrics | None = None,
        max_retry_backoff_s: float = 5.0,
    ) -> None:
        self._stage = stage
        self._consumer = consumer
        self._committer = committer
        self._input_topics = list(input_topics)
        self._dlq_topic = dlq_topic
        self._batch_size = batch_size
        self._batch_timeout_s = batch_timeout_s
        self._metrics: StageMetrics = metrics or NullMetrics()
        self._max_backoff_s = max_retry_backoff_s
        self._backoff_s = 0.0
        self.assigned: set[tuple[str, int]] = set()

    def run(self, stop: threading.Event) -> None:
        """Consume until ``stop`` is set; then finish the batch in hand, commit and close."""
        self._consumer.subscribe(
            self._input_topics,
            on_assign=self._on_assign,
            on_revoke=self._on_revoke,
            on_lost=self._on_revoke,
        )
        log.info("%s: consuming %s", self._stage.name, ", ".join(self._input_topics))
        try:
            while not stop.is_set():
                self.run_once()
        finally:
            self._committer.close()
            self._consumer.close()
            log.info("%s: closed", self._stage.name)

    def run_once(self) -> int:
        """Consume, process and commit one batch; returns the number of records consumed."""
        messages = self._consumer.consume(
            num_messages=self._batch_size, timeout=self._batch_timeout_s
        )
        batch = [to_record(m) for m in messages if self._usable(m)]
        if not batch:
            return 0
        started = time.monotonic()
        try:
            outcome = self._process(batch)
            outputs = outcome.outputs + [
                dlq_output(r, stage=self._stage.name, dlq_topic=self._dlq_topic)
                for r in outcome.rejected
            ]
            self._committer.publish(outputs, next_offsets(batch))
        except (SinkUnavailable, DeliveryFailed) as exc:
            self._rewind(batch, exc)
            return len(batch)
        self._backoff_s = 0.0
        self._metrics.batch(size=len(batch), seconds=time.monotonic() - started)
        self._metrics.records_out(len(outcome.outputs))
        for rejection in outcome.rejected:
            self._metrics.dead_lettered(rejection.reason)
        return len(batch)

    def _process(self, batch: Sequence[Record]) -> BatchOutcome:
        return process_isolating(self._stage, batch)

    def _rewind(self, batch: Sequence[Record], exc: Exception) -> None:
        """Seek back to the batch's first offsets so the next consume replays it."""
        self._metrics.retry()
        self._backoff_s = min(max(self._backoff_s * 2, 0.1), self._max_backoff_s)
        if isinstance(exc, SinkUnavailable):
            self._backoff_s = max(self._backoff_s, min(exc.retry_after_s, self._max_backoff_s))
        log.warning("%s: %s; retrying batch in %.1fs", self._stage.name, exc, self._backoff_s)
        for tp in first_offsets(batch):
            if (tp.topic, tp.partition) in self.assigned:
                self._consumer.seek(tp)
        # Short waits well inside max.poll.interval.ms; the next consume() keeps us in the group.
        time.sleep(self._backoff_s)

    def _usable(self, message: Message) -> bool:
        err = message.error()
        if err is None:
            return True
        if err.fatal():
            raise RuntimeError(f"{self._stage.name}: fatal consumer error: {err}")
        log.warning("%s: consumer error: %s", self._stage.name, err)
        return False

    def _on_assign(self, _consumer: Consumer, partitions: list[TopicPartition]) -> None:
        self.assigned.update((tp.topic, tp.partition) for tp in partitions)
        log.info("%s: assigned %s", self._stage.name, _fmt(partitions))

    def _on_revoke(self, _consumer: Consumer, partitions: list[TopicPartition]) -> None:
        self.assigned.difference_update((tp.topic, tp.partition) for tp in partitions)
        log.info("%s: revoked %s", self._stage.name, _fmt(partitions))


def _fmt(partitions: list[TopicPartition]) -> str:
    return ", ".join(f"{tp.topic}[{tp.partition}]" for tp in partitions) or "nothing"

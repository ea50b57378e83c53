"""The stage runtime: consume a batch -> transform -> produce -> commit.

Contract
--------
A :class:`Stage` turns a batch of consumed :class:`Record` s into a :class:`BatchOutcome`:
outputs to produce and rejections to dead-letter. It sees the whole batch at once so it can
vectorise (the infer stage runs one ``session.run`` per model per batch). It signals:

* a bad record by listing it in ``rejected`` (per-record code raises
  :class:`InvalidRecord`, which the stage catches);
* a transient downstream failure by raising :class:`SinkUnavailable`: the runtime pauses
  its partitions, keeps polling (so it stays in the group), and replays the batch after an
  exponential back-off; nothing is dead-lettered.

Any other exception from ``process`` is a bug or a poison record the stage did not foresee.
The runtime then replays the batch one record at a time, so the record that raises is
dead-lettered (reason ``stage_error``) and every other record still flows. A
:class:`DlqBudget` stops the stage when too many records fail that way.

Guarantee
---------
A :class:`~stages.committers.Committer` publishes outputs and commits offsets:
at-least-once (produce, wait for acks, commit) or exactly-once (Kafka transactions).
Rebalance callbacks only run inside ``consume``, and the batch in hand is always published
before the next ``consume``; on revoke the committer commits what is pending, on lost it
aborts it. Shutdown (``stop`` set, e.g. by SIGTERM) finishes the batch in hand, commits and
closes the consumer, which leaves the group at once.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence
from typing import Protocol

from confluent_kafka import (
    OFFSET_BEGINNING,
    Consumer,
    KafkaException,
    Message,
    TopicPartition,
)

from stages.committers import Committer
from stages.dlq import DlqBudget, dlq_output
from stages.errors import DeliveryFailed, SinkUnavailable, TransactionAborted
from stages.metrics import NullMetrics, StageMetrics
from stages.priority import PriorityGate
from stages.records import BatchOutcome, Record, Rejection

log = logging.getLogger(__name__)

# How long one loop waits for a first record when there is none: it bounds how late the
# loop notices a stop request, a due commit or the end of a back-off.
_IDLE_WAIT_S = 0.1


class Stage(Protocol):
    """One pipeline step. Implementations: ``stages.validate``, ``stages.infer``,
    ``stages.persist``."""

    name: str

    def process(self, batch: Sequence[Record]) -> BatchOutcome:
        """Transform ``batch`` (never empty). See the module docstring for the contract."""
        ...


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


class Backoff:
    """Exponential back-off between ``initial_s`` and ``max_s``; reset on success."""

    def __init__(self, *, initial_s: float = 0.1, max_s: float = 5.0) -> None:
        self._initial_s = initial_s
        self._max_s = max_s
        self.current_s = 0.0

    def next(self, at_least_s: float = 0.0) -> float:
        self.current_s = min(max(self.current_s * 2, self._initial_s, at_least_s), self._max_s)
        return self.current_s

    def reset(self) -> None:
        self.current_s = 0.0


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
        dlq_budget: DlqBudget | None = None,
        metrics: StageMetrics | None = None,
        backoff: Backoff | None = None,
        priority: PriorityGate | None = None,
    ) -> None:
        self._stage = stage
        self._consumer = consumer
        self._committer = committer
        self._input_topics = list(input_topics)
        self._dlq_topic = dlq_topic
        self._batch_size = batch_size
        self._batch_timeout_s = batch_timeout_s
        self._budget = dlq_budget
        self._metrics: StageMetrics = metrics or NullMetrics()
        self._backoff = backoff or Backoff()
        self._priority = priority
        self._paused_until: float | None = None
        self._rewind_needed = False
        self.assigned: set[tuple[str, int]] = set()

    def run(self, stop: threading.Event) -> None:
        """Consume until ``stop`` is set; then finish the batch in hand, commit and close."""
        self._consumer.subscribe(
            self._input_topics,
            on_assign=self._on_assign,
            on_revoke=self._on_revoke,
            on_lost=self._on_lost,
        )
        log.info("%s: consuming %s", self._stage.name, ", ".join(self._input_topics))
        if self._priority is not None:
            self._priority.start()
        try:
            while not stop.is_set():
                self.run_once()
        finally:
            if self._priority is not None:
                self._priority.close()
            self._committer.close()
            self._consumer.close()
            log.info("%s: closed", self._stage.name)

    def run_once(self) -> int:
        """Consume, process and publish one batch; returns the number of records consumed."""
        self._maybe_resume()
        messages = self._consume()
        if self._rewind_needed:  # a rebalance callback aborted: replay from committed offsets
            self._rewind_to_committed()
            return 0
        batch = [to_record(m) for m in messages if self._usable(m)]
        if self._priority is not None and self._paused_until is None:
            self._priority.update(self._consumer, self.assigned, (r.topic for r in batch))
        if not batch:
            self._commit_if_due()
            return 0
        started = time.monotonic()
        try:
            self._handle(batch)
        except (SinkUnavailable, DeliveryFailed) as exc:
            self._retry_later(batch, exc)
        except TransactionAborted as exc:
            log.warning("%s: transaction aborted (%s); rewinding", self._stage.name, exc)
            self._metrics.retry()
            self._rewind_to_committed()
        else:
            self._backoff.reset()
            self._metrics.batch(size=len(batch), seconds=time.monotonic() - started)
        return len(batch)

    def _handle(self, batch: list[Record]) -> None:
        outcome = process_isolating(self._stage, batch)
        if self._budget is not None:
            self._budget.observe(len(batch), outcome.rejected)
        dead = [
            dlq_output(r, stage=self._stage.name, dlq_topic=self._dlq_topic)
            for r in outcome.rejected
        ]
        self._committer.publish(outcome.outputs + dead, next_offsets(batch))
        self._metrics.records_out(len(outcome.outputs))
        for rejection in outcome.rejected:
            self._metrics.dead_lettered(rejection.reason)

    def _consume(self) -> list[Message]:
        """Wait for the first record (no longer than until a commit is due), then take what
        else is queued, up to ``batch_size``, waiting at most ``batch_timeout_s`` for more.

        Under load the queue is full and batches are full; at a trickle a record does not
        wait for a batch to fill: ``consume(N, timeout)`` alone blocks until N records or
        the timeout, which at 1,000 records/s cost each hop most of its timeout.
        """
        first = self._consumer.poll(self._idle_wait_s())
        if first is None:
            return []
        if self._batch_size == 1:
            return [first]
        rest = self._consumer.consume(
            num_messages=self._batch_size - 1, timeout=self._batch_timeout_s
        )
        return [first, *rest]

    def _idle_wait_s(self) -> float:
        due = self._committer.commit_due_in()
        return _IDLE_WAIT_S if due is None else min(_IDLE_WAIT_S, due)

    def _commit_if_due(self) -> None:
        if self._committer.commit_due_in() == 0.0:
            try:
                self._committer.commit()
            except TransactionAborted:
                self._rewind_to_committed()

    def _retry_later(self, batch: Sequence[Record], exc: Exception) -> None:
        """Pause every assigned partition, rewind to the batch's start, resume after a
        back-off. ``consume`` keeps being called meanwhile, so we stay in the group."""
        self._metrics.retry()
        at_least = exc.retry_after_s if isinstance(exc, SinkUnavailable) else 0.0
        delay = self._backoff.next(at_least)
        log.warning("%s: %s; pausing, retrying the batch in %.1fs", self._stage.name, exc, delay)
        try:
            self._committer.commit()  # earlier batches in an open transaction are good
        except TransactionAborted:
            self._rewind_needed = True
        assigned = self._assigned_partitions()
        self._consumer.pause(assigned)
        self._seek([tp for tp in first_offsets(batch) if (tp.topic, tp.partition) in self.assigned])
        self._paused_until = time.monotonic() + delay

    def _maybe_resume(self) -> None:
        if self._paused_until is not None and time.monotonic() >= self._paused_until:
            self._consumer.resume(self._assigned_partitions())
            self._paused_until = None
            if self._priority is not None:
                self._priority.reassert(self._consumer, self.assigned)

    def _rewind_to_committed(self) -> None:
        """Seek every assigned partition back to its committed offset."""
        self._rewind_needed = False
        assigned = self._assigned_partitions()
        if not assigned:
            return
        committed = self._consumer.committed(assigned, timeout=30)
        for tp in committed:
            if tp.offset < 0:  # nothing committed yet: start over, as auto.offset.reset does
                tp.offset = OFFSET_BEGINNING
        self._seek(committed)

    def _seek(self, partitions: Sequence[TopicPartition]) -> None:
        for tp in partitions:
            try:
                self._consumer.seek(tp)
            except KafkaException as exc:
                # Not yet fetching (just assigned): its position is the committed offset anyway.
                log.debug("seek %s[%d] failed: %s", tp.topic, tp.partition, exc)

    def _assigned_partitions(self) -> list[TopicPartition]:
        return [TopicPartition(t, p) for t, p in sorted(self.assigned)]

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
        """Commit what is pending while we still own the partitions."""
        try:
            self._committer.commit()
        except TransactionAborted:
            self._rewind_needed = True
        self.assigned.difference_update((tp.topic, tp.partition) for tp in partitions)
        log.info("%s: revoked %s", self._stage.name, _fmt(partitions))

    def _on_lost(self, _consumer: Consumer, partitions: list[TopicPartition]) -> None:
        """Another member owns these now: discard what we did not commit."""
        self._committer.abort()
        self._rewind_needed = True
        self.assigned.difference_update((tp.topic, tp.partition) for tp in partitions)
        log.warning("%s: lost %s", self._stage.name, _fmt(partitions))


def _fmt(partitions: list[TopicPartition]) -> str:
    return ", ".join(f"{tp.topic}[{tp.partition}]" for tp in partitions) or "nothing"

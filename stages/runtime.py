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
The runtime then replays the batch one record at a time (:mod:`stages.isolation`), so the
record that raises is dead-lettered (reason ``stage_error``) and every other record still
flows. A :class:`DlqBudget` stops the stage when too many records fail that way.

No record stops a stage: a Kafka message that cannot even be read as a :class:`Record`
(e.g. a header name that is not UTF-8, see :mod:`stages.consumed`) is dead-lettered as
``malformed``; an output larger than the producer's maximum is not produced: its record is
dead-lettered as ``too_large`` (and a dead letter that is itself too large is truncated, see
:func:`stages.dlq.dlq_output`).

Guarantee
---------
A :class:`~stages.committers.Committer` publishes outputs and commits offsets:
at-least-once (produce, wait for acks, commit) or exactly-once (Kafka transactions).
Rebalance callbacks only run inside ``consume``, and the batch in hand is always published
before the next ``consume``; on revoke the committer commits what is pending, on lost it
aborts it. Whenever what was published since the last commit is discarded
(:class:`TransactionAborted`, lost partitions), the runner rewinds every assigned partition
to its committed offset before it consumes on. Shutdown (``stop`` set, e.g. by SIGTERM)
finishes the batch in hand, commits and closes the consumer, which leaves the group at once.

The heap
--------
A worker's heap is mostly what it built at start-up (modules, the models' contracts and
sessions): tens of thousands of objects that never die but that every full collection of
the garbage collector scans (about 50 ms on a loaded 2-core box: a stall every few thousand
records). While :meth:`StageRunner.run` runs, :func:`settled_heap` keeps that heap out of
the collector's sight (``gc.freeze()``) and lets a batch's objects die by reference counting
before a collection looks at them (a first-generation threshold of tens of thousands of
allocations instead of 700, above what a batch keeps alive). Per :class:`HeapPolicy`; see
the bench README's tuning log.

Pauses
------
Partitions are paused for two reasons: the back-off after a transient failure
(``backoff``, every assigned partition) and the live-first rule (``priority``, the backfill
partitions; see :mod:`stages.priority`). :class:`~stages.pauses.Pauses` keeps who holds
what: a partition is resumed only when no reason holds it any more.
"""

from __future__ import annotations

import gc
import logging
import os
import threading
import time
from collections.abc import Callable, Collection, Iterable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass
from typing import Final, Protocol

from confluent_kafka import (
    OFFSET_BEGINNING,
    Consumer,
    KafkaError,
    KafkaException,
    Message,
    TopicPartition,
)

from stages.committers import EXIT_STUCK, Committer
from stages.consumed import first_offsets, next_offsets, read_messages
from stages.dlq import DlqBudget, dlq_output
from stages.errors import (
    ConsumerFailed,
    ConsumerStuck,
    DeliveryFailed,
    OutputTooLarge,
    SinkUnavailable,
    TransactionAborted,
)
from stages.isolation import process_within_limit
from stages.metrics import AssignmentGauges, NullMetrics, StageMetrics
from stages.pauses import Backoff, Partition, Pauses, topic_partitions
from stages.priority import LiveLagReader, PriorityGate, Reading
from stages.records import BatchOutcome, Output, Record, Rejection
from stages.tracing import NO_TRACING, BatchTrace, StageTracer

log = logging.getLogger(__name__)

# How long one loop waits for a first record when there is none: it bounds how late the
# loop notices a stop request, a due commit or the end of a back-off.
_IDLE_WAIT_S = 0.1
# Below this, a size limit learned from the producer means a misconfiguration, not a record.
_MIN_RECORD_BYTES = 1024


@dataclass(frozen=True, slots=True)
class HeapPolicy:
    """How :func:`settled_heap` sets the garbage collector up while a runner runs.

    ``freeze``: move everything alive when the loop starts to the permanent generation, which
    collections never scan. ``gen0_per_record`` (at least ``gen0_min``): allocations between
    two young collections, per record of a full batch. A batch of N records keeps about 15 N
    container objects alive until it is published; Python's default threshold (700) starts a
    few collections per batch, each scanning the batch in hand and promoting it towards the
    old generations, which brings the next full collection closer. Above the batch's peak,
    a collection only starts when objects pile up (reference cycles), and then scans those.
    ``gen0_per_record=0`` keeps the current threshold.
    """

    freeze: bool = True
    gen0_per_record: int = 40
    gen0_min: int = 50_000

    def gen0_threshold(self, batch_size: int) -> int | None:
        if self.gen0_per_record <= 0:
            return None
        return max(self.gen0_min, self.gen0_per_record * batch_size)


DEFAULT_HEAP_POLICY: Final = HeapPolicy()


@contextmanager
def settled_heap(policy: HeapPolicy | None, batch_size: int) -> Iterator[None]:
    """Apply ``policy`` for batches of ``batch_size`` (None: leave the collector alone) for
    the block, then undo it."""
    if policy is None:
        yield
        return
    previous = gc.get_threshold()
    gc.collect()  # what start-up left as garbage is not worth freezing
    if policy.freeze:
        gc.freeze()
    gen0 = policy.gen0_threshold(batch_size)
    if gen0 is not None:
        gc.set_threshold(gen0, *previous[1:])
    try:
        yield
    finally:
        gc.set_threshold(*previous)
        if policy.freeze:
            gc.unfreeze()


class Stage(Protocol):
    """One pipeline step. Implementations: ``stages.validate``, ``stages.infer``,
    ``stages.persist``."""

    name: str

    def process(self, batch: Sequence[Record]) -> BatchOutcome:
        """Transform ``batch`` (never empty). See the module docstring for the contract."""
        ...


class StageRunner:
    """Runs one stage as one consumer-group member. See the module docstring.

    ``priority`` (validate only) decides which backfill partitions wait; ``downstream``
    gives it the latest downstream reading. ``running`` is entered for as long as
    :meth:`run` runs: whoever builds the runner starts and stops there what the runner
    needs alongside it (the downstream reading thread). ``max_record_bytes`` is the
    producer's maximum record size; ``clock`` is monotonic seconds. ``tracer`` records a
    span per batch step (:mod:`stages.tracing`; default: none). ``heap`` is how the garbage
    collector is set up while :meth:`run` runs (see :class:`HeapPolicy`; None: untouched).
    """

    def __init__(
        self,
        *,
        stage: Stage,
        consumer: Consumer,
        committer: Committer,
        input_topics: Sequence[str],
        dlq_topic: str,
        batch_size: int,
        batch_timeout_s: float | Callable[[], float],
        max_record_bytes: int = 1_000_000,
        dlq_budget: DlqBudget | None = None,
        metrics: StageMetrics | None = None,
        backoff: Backoff | None = None,
        priority: PriorityGate | None = None,
        downstream: Callable[[], Reading | None] = lambda: None,
        running: AbstractContextManager[object] | None = None,
        clock: Callable[[], float] = time.monotonic,
        tracer: StageTracer = NO_TRACING,
        heap: HeapPolicy | None = DEFAULT_HEAP_POLICY,
        rejoin_timeout_s: float = 120.0,
    ) -> None:
        self._stage = stage
        self._consumer = consumer
        self._committer = committer
        self._input_topics = list(input_topics)
        self._dlq_topic = dlq_topic
        self._batch_size = batch_size
        self._batch_timeout_s = batch_timeout_s
        self._max_bytes = max_record_bytes
        self._budget = dlq_budget
        self._metrics: StageMetrics = metrics or NullMetrics()
        self._backoff = backoff or Backoff()
        self._priority = priority
        self._downstream = downstream
        self._running = running or nullcontext()
        self._clock = clock
        self._tracer = tracer
        self._heap = heap
        self._pauses = Pauses(consumer)
        self._live_lag = LiveLagReader(consumer)
        self._gauges = AssignmentGauges(consumer, self._metrics)
        self._retry_at: float | None = None
        self._rewind_due = False
        self._rejoin_timeout_s = rejoin_timeout_s
        self._lost_at: float | None = None  # partitions lost, none assigned since
        self.assigned: set[Partition] = set()

    @property
    def pauses(self) -> Pauses:
        return self._pauses

    def run(self, stop: threading.Event) -> None:
        """Consume until ``stop`` is set; then finish the batch in hand, commit and close."""
        self._consumer.subscribe(
            self._input_topics,
            on_assign=self._on_assign,
            on_revoke=self._on_revoke,
            on_lost=self._on_lost,
        )
        log.info("%s: consuming %s", self._stage.name, ", ".join(self._input_topics))
        try:
            # The heap is settled after start-up, once the models are loaded.
            with self._running, settled_heap(self._heap, self._batch_size):
                while not stop.is_set():
                    self.run_once()
        except ConsumerStuck as exc:
            # Not through the finally below: closing the consumer waits on the coordinator
            # it is stuck with. What was not committed is replayed by the next owner.
            log.critical("%s; exiting with %d so that a fresh worker takes over", exc, EXIT_STUCK)
            os._exit(EXIT_STUCK)
        finally:
            self._committer.close()
            self._consumer.close()
            log.info("%s: closed", self._stage.name)

    def run_once(self) -> int:
        """Consume, process and publish one batch; returns the number of records consumed."""
        self._check_rejoined()
        self._resume_if_due()
        consume_started_ns = time.time_ns()
        consumed = self._consume()
        messages = [m for m in consumed if m.error() is None]
        if len(messages) < len(consumed):  # rare: say what each error is (or fail)
            messages = [m for m in consumed if self._usable(m)]
        if self._rewind_due:  # discarded since the last commit: replay from committed offsets
            self._rewind_to_committed()
            return 0
        records, unreadable = read_messages(messages)
        self._apply_priority(records)
        self._gauges.sample(self.assigned, paused=len(self._pauses.paused()))
        if not messages:
            self._commit_if_due()
            return 0
        started = self._clock()
        try:
            trace = self._tracer.batch(records, consume_started_ns=consume_started_ns)
            with self._rewind_on_abort(), trace:
                # Fewer than asked: nothing more is waiting (the committer may commit now).
                drained = len(messages) < self._batch_size
                self._handle(records, unreadable, trace, drained=drained)
        except (SinkUnavailable, DeliveryFailed) as exc:
            self._retry_later([*records, *(r.record for r in unreadable)], exc)
        else:
            if not self._rewind_due:
                self._backoff.reset()
                self._metrics.batch(size=len(messages), seconds=self._clock() - started)
        return len(messages)

    def _handle(
        self,
        records: list[Record],
        unreadable: list[Rejection],
        trace: BatchTrace,
        *,
        drained: bool = False,
    ) -> None:
        outcome = BatchOutcome(outputs=[], rejected=list(unreadable))
        if records:
            with trace.step("transform"):
                outcome.extend(process_within_limit(self._stage, records, self._max_bytes))
        if self._budget is not None:
            self._budget.observe(len(records) + len(unreadable), outcome.rejected)
        dead = [self._dead_letter(r) for r in outcome.rejected]
        offsets = next_offsets([*records, *(r.record for r in unreadable)])
        trace.outcome(outcome)  # before producing: outputs name their record's span
        with trace.step("produce"):
            self._committer.publish(outcome.outputs + dead, offsets, drained=drained)
        self._metrics.records_out(len(outcome.outputs))
        for rejection in outcome.rejected:
            self._metrics.dead_lettered(rejection.reason)

    def _dead_letter(self, rejection: Rejection) -> Output:
        return dlq_output(
            rejection, stage=self._stage.name, dlq_topic=self._dlq_topic, max_bytes=self._max_bytes
        )

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
        # A callable: the infer stage's per-model max_queue_delay, which the control plane
        # may change while the worker runs.
        wait = self._batch_timeout_s
        timeout = wait() if callable(wait) else wait
        rest = self._consumer.consume(num_messages=self._batch_size - 1, timeout=timeout)
        return [first, *rest]

    def _idle_wait_s(self) -> float:
        due = self._committer.commit_due_in()
        return _IDLE_WAIT_S if due is None else min(_IDLE_WAIT_S, due)

    def _apply_priority(self, batch: Sequence[Record]) -> None:
        """Hold paused the backfill partitions that the live-first gate says must wait."""
        gate = self._priority
        if gate is None:
            return
        gate.admit(r.topic for r in batch)
        if not gate.bulk_partitions(self.assigned):
            self._pauses.release("priority")
            return
        live = self._live_lag.read(gate.live_partitions(self.assigned))
        wait = gate.decide(
            assigned=self.assigned, live=live, reading=self._downstream(), now=self._clock()
        )
        self._pauses.hold("priority", wait)

    def _commit_if_due(self) -> None:
        if self._committer.commit_due_in() == 0.0:
            self._commit_or_rewind()

    def _commit_or_rewind(self) -> None:
        """Commit what is pending; if that aborts, rewind before consuming on."""
        with self._rewind_on_abort():
            self._committer.commit()

    @contextmanager
    def _rewind_on_abort(self) -> Iterator[None]:
        """The one place a discarded transaction is handled: every partition rewinds to its
        committed offset before the next batch is processed (see :meth:`run_once`)."""
        try:
            yield
        except TransactionAborted as exc:
            if isinstance(exc, OutputTooLarge):
                self._lower_size_limit(exc.size)
            self._rewind_later(f"transaction aborted ({exc})")

    def _rewind_later(self, why: str) -> None:
        log.warning("%s: %s; rewinding to the committed offsets", self._stage.name, why)
        self._metrics.retry()
        self._rewind_due = True

    def _lower_size_limit(self, refused_size: int) -> None:
        """The producer refused an output our estimate let through: stay under it from now
        on, so that the replayed record is dead-lettered (``too_large``) instead."""
        self._max_bytes = min(self._max_bytes, refused_size - 1)
        if self._max_bytes < _MIN_RECORD_BYTES:
            raise RuntimeError(
                f"{self._stage.name}: the producer refuses records of {refused_size} bytes; "
                "check message.max.bytes and queue.buffering.max.kbytes"
            )
        log.warning("%s: record size limit lowered to %d bytes", self._stage.name, self._max_bytes)

    def _retry_later(self, batch: Sequence[Record], exc: Exception) -> None:
        """Pause every assigned partition, rewind to the batch's start, resume after a
        back-off. ``consume`` keeps being called meanwhile, so we stay in the group."""
        self._metrics.retry()
        at_least = exc.retry_after_s if isinstance(exc, SinkUnavailable) else 0.0
        delay = self._backoff.next(at_least)
        self._metrics.backoff(delay)
        log.warning("%s: %s; pausing, retrying the batch in %.1fs", self._stage.name, exc, delay)
        self._commit_or_rewind()  # earlier batches in an open transaction are good
        self._pauses.hold("backoff", self.assigned)
        self._seek([tp for tp in first_offsets(batch) if (tp.topic, tp.partition) in self.assigned])
        self._retry_at = self._clock() + delay

    def _resume_if_due(self) -> None:
        if self._retry_at is not None and self._clock() >= self._retry_at:
            self._pauses.release("backoff")
            self._retry_at = None

    def _rewind_to_committed(self) -> None:
        """Seek every assigned partition back to its committed offset."""
        self._rewind_due = False
        assigned = topic_partitions(self.assigned)
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

    def _usable(self, message: Message) -> bool:
        err = message.error()
        if err is None:
            return True
        # A static member fenced by another with its group.instance.id reports _FATAL with
        # fatal() False; logging it would leave a live process that consumes nothing.
        if err.fatal() or err.code() == KafkaError._FATAL:
            raise ConsumerFailed(f"{self._stage.name}: fatal consumer error: {err}")
        log.warning("%s: consumer error: %s", self._stage.name, err)
        return False

    def _check_rejoined(self) -> None:
        """Raise :class:`ConsumerStuck` if partitions were lost longer than the rejoin
        timeout ago and no assignment came since (an empty one counts: librdkafka calls the
        assign callback after every rebalance, so an idle extra member is not stuck)."""
        if self._lost_at is not None and self._clock() - self._lost_at > self._rejoin_timeout_s:
            raise ConsumerStuck(
                f"{self._stage.name}: lost its partitions {self._rejoin_timeout_s:.0f}s ago and "
                "has been assigned nothing since (stuck rejoining the group)"
            )

    def _on_assign(self, _consumer: Consumer, partitions: list[TopicPartition]) -> None:
        self._lost_at = None
        self.assigned.update(_keys(partitions))
        log.info("%s: assigned %s", self._stage.name, _fmt(partitions))

    def _on_revoke(self, _consumer: Consumer, partitions: list[TopicPartition]) -> None:
        """Commit what is pending while we still own the partitions."""
        self._commit_or_rewind()
        self._unassign(partitions)
        log.info("%s: revoked %s", self._stage.name, _fmt(partitions))

    def _on_lost(self, _consumer: Consumer, partitions: list[TopicPartition]) -> None:
        """Another member owns these now: discard what we did not commit."""
        self._committer.abort()
        if self._lost_at is None:
            self._lost_at = self._clock()
        self._rewind_later("partitions lost")
        self._unassign(partitions)
        log.warning("%s: lost %s", self._stage.name, _fmt(partitions))

    def _unassign(self, partitions: Collection[TopicPartition]) -> None:
        gone = _keys(partitions)
        self.assigned.difference_update(gone)
        self._pauses.forget(gone)
        self._live_lag.forget(gone)


def _keys(partitions: Iterable[TopicPartition]) -> set[Partition]:
    return {(tp.topic, tp.partition) for tp in partitions}


def _fmt(partitions: list[TopicPartition]) -> str:
    return ", ".join(f"{tp.topic}[{tp.partition}]" for tp in partitions) or "nothing"

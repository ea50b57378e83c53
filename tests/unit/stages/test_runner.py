"""StageRunner against a stand-in consumer and committer (no broker): batches, back-off,
rewind on abort, revoke, lost, shutdown, unreadable and oversized records, pauses.

The stand-ins keep just enough of Kafka's behaviour to fail when the runner is wrong: a
consumer serves each assigned, unpaused partition from its position, ``seek`` moves the
position, and ``committed`` answers what the committer committed."""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import pytest
from confluent_kafka import OFFSET_BEGINNING, OFFSET_INVALID, KafkaError, TopicPartition

from stages.errors import (
    ConsumerFailed,
    ConsumerStuck,
    DeliveryFailed,
    OutputTooLarge,
    SinkUnavailable,
    TransactionAborted,
)
from stages.pauses import Backoff, Pauses
from stages.priority import PriorityGate, Reading
from stages.records import BatchOutcome, Output, Record, wire_size
from stages.runtime import StageRunner

IN, BULK, OUT, DLQ = "in", "bulk", "out", "dlq"
Key = tuple[str, int]


@dataclass
class Message:
    """What the runner reads of a confluent_kafka.Message."""

    _topic: str
    _partition: int
    _offset: int
    _value: bytes
    _headers: list[tuple[str, bytes]] | None = None
    bad_headers: bool = False

    def topic(self) -> str:
        return self._topic

    def partition(self) -> int:
        return self._partition

    def offset(self) -> int:
        return self._offset

    def key(self) -> bytes:
        return b"k"

    def value(self) -> bytes:
        return self._value

    def headers(self) -> list[tuple[str, bytes]] | None:
        if self.bad_headers:  # what confluent-kafka does for a header name that is not UTF-8
            raise UnicodeDecodeError("utf-8", b"\xff", 0, 1, "invalid start byte")
        return self._headers

    def timestamp(self) -> tuple[int, int]:
        return (1, 0)

    def error(self) -> None:
        return None


class Consumer:
    """A log per partition, served from each assigned, unpaused partition's position."""

    def __init__(self, logs: dict[Key, list[Message]]) -> None:
        self.logs = logs
        self.positions: dict[Key, int] = {}
        self.committed_offsets: dict[Key, int] = {}
        self.assignment: set[Key] = set()
        self.paused: set[Key] = set()
        self.callbacks: dict[str, Any] = {}
        self.closed = False
        self.seeks: list[tuple[Key, int]] = []

    def subscribe(self, topics: list[str], **callbacks: Any) -> None:
        self.callbacks = callbacks

    def assign(self, keys: Sequence[Key]) -> None:
        """A rebalance that assigns ``keys``: fetching starts at the committed offsets."""
        for key in keys:
            self.assignment.add(key)
            self.positions[key] = self.committed_offsets.get(key, 0)
        self.callbacks["on_assign"](self, [TopicPartition(*k) for k in keys])

    def revoke(self, keys: Sequence[Key], *, lost: bool = False) -> None:
        callback = self.callbacks["on_lost" if lost else "on_revoke"]
        callback(self, [TopicPartition(*k) for k in keys])
        self.assignment.difference_update(keys)
        self.paused.difference_update(keys)  # as librdkafka: a new assignment is not paused

    def poll(self, timeout: float) -> Message | None:
        batch = self.consume(1, timeout)
        return batch[0] if batch else None

    def consume(self, num_messages: int, timeout: float) -> list[Message]:
        out: list[Message] = []
        for key in sorted(self.assignment - self.paused):
            log = self.logs.get(key, [])
            while self.positions[key] < len(log) and len(out) < num_messages:
                out.append(log[self.positions[key]])
                self.positions[key] += 1
        return out

    def pause(self, partitions: list[TopicPartition]) -> None:
        self.paused.update(_keys(partitions))

    def resume(self, partitions: list[TopicPartition]) -> None:
        self.paused.difference_update(_keys(partitions))

    def seek(self, tp: TopicPartition) -> None:
        key = (tp.topic, tp.partition)
        self.seeks.append((key, tp.offset))
        self.positions[key] = 0 if tp.offset == OFFSET_BEGINNING else tp.offset

    def committed(self, partitions: list[TopicPartition], timeout: float) -> list[TopicPartition]:
        return [
            TopicPartition(tp.topic, tp.partition, self.committed_offsets.get(key, -1001))
            for tp, key in zip(partitions, _keys_list(partitions), strict=True)
        ]

    def position(self, partitions: list[TopicPartition]) -> list[TopicPartition]:
        return [
            TopicPartition(tp.topic, tp.partition, self.positions.get(key, OFFSET_INVALID))
            for tp, key in zip(partitions, _keys_list(partitions), strict=True)
        ]

    def get_watermark_offsets(self, tp: TopicPartition, cached: bool) -> tuple[int, int]:
        return 0, len(self.logs.get((tp.topic, tp.partition), []))

    def close(self) -> None:
        self.closed = True


def _keys(partitions: list[TopicPartition]) -> set[Key]:
    return set(_keys_list(partitions))


def _keys_list(partitions: list[TopicPartition]) -> list[Key]:
    return [(tp.topic, tp.partition) for tp in partitions]


@dataclass
class Committer:
    """Publishes into ``published`` and commits into the consumer's committed offsets at
    once; ``fail_publish`` / ``fail_commit`` are raised by the next calls, one each."""

    consumer: Consumer
    published: list[Output] = field(default_factory=list)
    pending: list[Output] = field(default_factory=list)
    pending_offsets: dict[Key, int] = field(default_factory=dict)
    fail_publish: list[Exception] = field(default_factory=list)
    fail_commit: list[Exception] = field(default_factory=list)
    calls: list[str] = field(default_factory=list)
    drained: list[bool] = field(default_factory=list)  # per publish: did the batch drain?
    transactional: bool = False

    def publish(
        self, outputs: Sequence[Output], offsets: Sequence[TopicPartition], *, drained: bool = False
    ) -> None:
        self.calls.append("publish")
        self.drained.append(drained)
        if self.fail_publish:
            self.abort()
            raise self.fail_publish.pop(0)
        self.pending.extend(outputs)
        self.pending_offsets.update({(tp.topic, tp.partition): tp.offset for tp in offsets})
        if not self.transactional:
            self.commit()

    def commit(self) -> None:
        self.calls.append("commit")
        if self.fail_commit:
            self.abort()
            raise self.fail_commit.pop(0)
        self.published.extend(self.pending)
        self.consumer.committed_offsets.update(self.pending_offsets)
        self.pending, self.pending_offsets = [], {}

    def commit_due_in(self) -> float | None:
        return 0.0 if self.pending else None

    def abort(self) -> None:
        self.calls.append("abort")
        self.pending, self.pending_offsets = [], {}

    def close(self) -> None:
        self.calls.append("close")
        self.commit()


class Echo:
    """Each record becomes one output with the same value; ``unavailable`` times it raises
    SinkUnavailable first; a value starting with ``big`` becomes an output of ``big`` bytes."""

    name = "echo"

    def __init__(self, *, unavailable: int = 0, big: int = 0) -> None:
        self.unavailable = unavailable
        self.big = big
        self.seen: list[int] = []

    def process(self, batch: Sequence[Record]) -> BatchOutcome:
        if self.unavailable:
            self.unavailable -= 1
            raise SinkUnavailable("down", retry_after_s=1.0)
        self.seen.extend(r.offset for r in batch)
        return BatchOutcome(
            outputs=[
                Output(topic=OUT, key=r.key, value=self._value(r.value), headers=[]) for r in batch
            ],
            rejected=[],
        )

    def _value(self, value: bytes) -> bytes:
        return b"x" * self.big if value.startswith(b"big") else value


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def messages(topic: str, partition: int, values: Sequence[bytes]) -> list[Message]:
    return [Message(topic, partition, i, v) for i, v in enumerate(values)]


@dataclass
class Setup:
    consumer: Consumer
    committer: Committer
    stage: Echo
    clock: Clock
    runner: StageRunner

    def run(self, loops: int = 1) -> None:
        for _ in range(loops):
            self.runner.run_once()

    def values(self, topic: str = OUT) -> list[bytes]:
        return [o.value for o in self.committer.published if o.topic == topic]

    def dead(self) -> list[dict[str, bytes]]:
        return [
            {k: v for k, v in o.headers if isinstance(v, bytes)}
            for o in self.committer.published
            if o.topic == DLQ
        ]


def setup(
    logs: dict[Key, list[Message]],
    *,
    stage: Echo | None = None,
    transactional: bool = False,
    assign: Sequence[Key] | None = None,
    **kwargs: Any,
) -> Setup:
    consumer = Consumer(logs)
    committer = Committer(consumer, transactional=transactional)
    clock = Clock()
    stage = stage or Echo()
    runner = StageRunner(
        stage=stage,
        consumer=consumer,  # type: ignore[arg-type]
        committer=committer,
        input_topics=sorted({t for t, _ in logs}),
        dlq_topic=DLQ,
        batch_size=kwargs.pop("batch_size", 3),
        batch_timeout_s=0.0,
        clock=clock,
        **kwargs,
    )
    consumer.subscribe(
        [], on_assign=runner._on_assign, on_revoke=runner._on_revoke, on_lost=runner._on_lost
    )
    consumer.assign(list(logs) if assign is None else assign)
    return Setup(consumer, committer, stage, clock, runner)


def test_batches_are_published_with_their_offsets() -> None:
    s = setup({(IN, 0): messages(IN, 0, [b"a", b"b", b"c", b"d"])})
    s.run(3)
    assert s.values() == [b"a", b"b", b"c", b"d"]
    assert s.consumer.committed_offsets == {(IN, 0): 4}


def test_the_committer_hears_whether_a_batch_drained_the_input() -> None:
    s = setup({(IN, 0): messages(IN, 0, [b"a", b"b", b"c", b"d"])}, batch_size=3)
    s.run(2)  # a full batch (more may be waiting), then the rest
    assert s.committer.drained == [False, True]


def test_a_sink_outage_pauses_and_replays_the_batch_after_the_back_off() -> None:
    s = setup({(IN, 0): messages(IN, 0, [b"a", b"b"])}, stage=Echo(unavailable=1))
    s.run()
    assert s.consumer.paused == {(IN, 0)}
    assert s.runner.pauses.held_by("backoff") == {(IN, 0)}
    assert s.consumer.positions[(IN, 0)] == 0, "rewound to the batch's start"
    s.clock.now += 0.9  # retry_after_s=1.0: not yet
    s.run()
    assert s.values() == [] and s.consumer.paused == {(IN, 0)}
    s.clock.now += 0.2
    s.run()
    assert s.consumer.paused == set()
    assert s.values() == [b"a", b"b"]
    assert s.committer.published[0].topic == OUT, "nothing dead-lettered"


def test_the_back_off_grows_while_the_outage_lasts() -> None:
    backoff = Backoff(initial_s=0.1, max_s=5.0)
    s = setup({(IN, 0): messages(IN, 0, [b"a"])}, stage=Echo(unavailable=3), backoff=backoff)
    delays = []
    for _ in range(3):
        s.run()
        delays.append(backoff.current_s)
        s.clock.now += backoff.current_s
    s.run()
    assert delays == [1.0, 2.0, 4.0]  # at least retry_after_s, then doubling
    assert s.values() == [b"a"]
    assert backoff.current_s == 0.0, "reset after a success"


def test_an_aborted_transaction_rewinds_to_the_committed_offsets() -> None:
    s = setup({(IN, 0): messages(IN, 0, [b"a", b"b", b"c", b"d", b"e"])}, transactional=True)
    s.run()  # a, b, c published in the open transaction
    s.committer.commit()
    s.run()  # d, e
    s.committer.fail_commit.append(TransactionAborted("fenced"))
    s.run()  # nothing new; the due commit aborts: d, e are discarded
    assert s.consumer.committed_offsets == {(IN, 0): 3}
    s.run()  # rewinds instead of processing
    assert s.consumer.positions[(IN, 0)] == 3
    s.run()
    s.committer.commit()
    assert s.values() == [b"a", b"b", b"c", b"d", b"e"]
    assert s.stage.seen == [0, 1, 2, 3, 4, 3, 4]


def test_an_aborted_publish_replays_the_batch() -> None:
    s = setup({(IN, 0): messages(IN, 0, [b"a", b"b"])})
    s.committer.fail_publish.append(TransactionAborted("abortable"))
    s.run(3)
    assert s.values() == [b"a", b"b"]
    assert s.stage.seen == [0, 1, 0, 1]


def test_a_revoke_commits_what_is_pending_first() -> None:
    logs = {(IN, 0): messages(IN, 0, [b"a"]), (IN, 1): messages(IN, 1, [b"b"])}
    s = setup(logs, transactional=True, batch_size=2)
    s.run()
    s.consumer.revoke([(IN, 1)])
    assert s.consumer.committed_offsets == {(IN, 0): 1, (IN, 1): 1}
    assert s.runner.assigned == {(IN, 0)}
    assert s.values() == [b"a", b"b"]


def test_a_revoke_whose_commit_aborts_rewinds_what_is_left() -> None:
    logs = {(IN, 0): messages(IN, 0, [b"a"]), (IN, 1): messages(IN, 1, [b"b"])}
    s = setup(logs, transactional=True, batch_size=2)
    s.run()
    s.committer.fail_commit.append(TransactionAborted("coordinator gone"))
    s.consumer.revoke([(IN, 1)])
    s.run()  # the rewind
    assert s.consumer.positions[(IN, 0)] == 0
    assert s.consumer.seeks == [((IN, 0), OFFSET_BEGINNING)]  # nothing committed there yet
    s.run()
    s.committer.commit()
    assert s.values() == [b"a"]


def test_lost_partitions_are_aborted_and_the_rest_rewound() -> None:
    logs = {(IN, 0): messages(IN, 0, [b"a", b"b"]), (IN, 1): messages(IN, 1, [b"c"])}
    s = setup(logs, transactional=True, batch_size=3)
    s.run()  # a, b, c in the open transaction
    s.consumer.revoke([(IN, 1)], lost=True)
    assert s.committer.calls[-1] == "abort"
    assert s.committer.pending == []
    s.run()  # rewinds (IN, 0) to its start
    s.run()
    s.committer.commit()
    assert s.values() == [b"a", b"b"], "the lost partition's output was discarded"
    assert s.consumer.committed_offsets == {(IN, 0): 2}


def test_shutdown_finishes_commits_and_closes() -> None:
    s = setup({(IN, 0): messages(IN, 0, [b"a", b"b"])}, transactional=True)
    stop = threading.Event()
    original = s.runner.run_once

    def once() -> int:
        count = original()
        stop.set()  # e.g. SIGTERM during the first batch
        return count

    s.runner.run_once = once  # type: ignore[method-assign]
    s.runner.run(stop)
    assert s.values() == [b"a", b"b"]
    assert s.consumer.committed_offsets == {(IN, 0): 2}
    assert s.committer.calls[-2:] == ["close", "commit"]
    assert s.consumer.closed


def test_a_record_with_unreadable_headers_is_dead_lettered_malformed() -> None:
    log = messages(IN, 0, [b"a", b"b", b"c"])
    log[1].bad_headers = True
    s = setup({(IN, 0): log})
    s.run()
    assert s.values() == [b"a", b"c"]
    [dead] = s.dead()
    assert dead["dlq.reason"] == b"malformed"
    assert dead["dlq.source.offset"] == b"1"
    assert b"UnicodeDecodeError" in dead["dlq.error"]
    assert s.consumer.committed_offsets == {(IN, 0): 3}


def test_an_output_over_the_limit_dead_letters_its_record() -> None:
    s = setup(
        {(IN, 0): messages(IN, 0, [b"a", b"big", b"c"])},
        stage=Echo(big=5000),
        max_record_bytes=2000,
    )
    s.run()
    assert s.values() == [b"a", b"c"]
    [dead] = s.dead()
    assert dead["dlq.reason"] == b"too_large"
    assert dead["dlq.source.offset"] == b"1"
    assert all(wire_size(o) <= 2000 for o in s.committer.published)
    assert s.consumer.committed_offsets == {(IN, 0): 3}


def test_a_dead_letter_over_the_limit_is_truncated() -> None:
    log = messages(IN, 0, [b"v" * 5000])
    log[0].bad_headers = True
    s = setup({(IN, 0): log}, max_record_bytes=2000)
    s.run()
    [out] = s.committer.published
    headers = dict(out.headers)
    assert headers["dlq.truncated"] == b"5000"
    assert out.value == b"v" * len(out.value) and 0 < len(out.value) < 2000
    assert wire_size(out) <= 2000


def test_a_record_the_producer_refuses_is_dead_lettered_on_the_replay() -> None:
    """The runner's estimate let a 1,500-byte output through; the producer refused it."""
    s = setup({(IN, 0): messages(IN, 0, [b"a", b"big"])}, stage=Echo(big=1400))
    s.committer.fail_publish.append(OutputTooLarge("refused", size=1500))
    s.run(3)
    assert s.values() == [b"a"]
    [dead] = s.dead()
    assert dead["dlq.reason"] == b"too_large"


def test_delivery_failures_are_retried_not_dead_lettered() -> None:
    s = setup({(IN, 0): messages(IN, 0, [b"a"])})
    s.committer.fail_publish.append(DeliveryFailed("broker down"))
    s.run()
    assert s.consumer.paused == {(IN, 0)}
    s.clock.now += 1.0
    s.run(2)
    assert s.values() == [b"a"] and s.dead() == []


def test_pauses_are_released_only_by_the_reason_that_holds_them() -> None:
    consumer = Consumer({})
    pauses = Pauses(consumer)  # type: ignore[arg-type]
    pauses.hold("priority", {(BULK, 0)})
    pauses.hold("backoff", {(IN, 0), (BULK, 0)})
    assert consumer.paused == {(IN, 0), (BULK, 0)}
    pauses.release("backoff")
    assert consumer.paused == {(BULK, 0)}, "the back-off must not resume the gate's pause"
    pauses.hold("priority", set())
    assert consumer.paused == set()


def test_a_forgotten_partition_is_paused_again_when_reassigned() -> None:
    consumer = Consumer({})
    pauses = Pauses(consumer)  # type: ignore[arg-type]
    pauses.hold("priority", {(BULK, 0)})
    pauses.forget({(BULK, 0)})
    consumer.paused.clear()  # revoked: librdkafka forgets the pause
    pauses.hold("priority", {(BULK, 0)})
    assert consumer.paused == {(BULK, 0)}


def test_a_partition_lost_while_paused_is_resumed_in_the_consumer() -> None:
    # librdkafka keeps the pause flag of a partition lost while paused (cooperative-sticky):
    # assigned back, it never fetched again (the broker-restart fault test, at-least-once).
    consumer = Consumer({})
    pauses = Pauses(consumer)  # type: ignore[arg-type]
    pauses.hold("backoff", {(IN, 0), (IN, 1)})
    pauses.forget({(IN, 0)})
    assert consumer.paused == {(IN, 1)}
    assert pauses.paused() == {(IN, 1)}


def test_a_worker_assigned_nothing_long_after_losing_its_partitions_exits_for_a_restart() -> None:
    # librdkafka can stay stuck rejoining after a broker restart: the worker lives on and
    # consumes nothing (the broker-restart fault test, at-least-once, a clean-clone CI run).
    s = setup({(IN, 0): messages(IN, 0, [b"a"])}, rejoin_timeout_s=60.0)
    s.consumer.revoke([(IN, 0)], lost=True)
    s.clock.now += 59.0
    s.run()  # rejoining for a while is normal
    s.clock.now += 2.0
    with pytest.raises(ConsumerStuck, match="assigned nothing"):
        s.run()


def test_any_assignment_after_a_loss_counts_as_rejoined_even_an_empty_one() -> None:
    s = setup({(IN, 0): messages(IN, 0, [b"a"])}, rejoin_timeout_s=60.0)
    s.consumer.revoke([(IN, 0)], lost=True)
    s.clock.now += 30.0
    s.consumer.assign([])  # an idle extra member: the rebalance completed, nothing for it
    s.clock.now += 300.0
    s.run()
    s.consumer.assign([(IN, 0)])
    s.run()
    assert s.values() == [b"a"]


def _gate() -> PriorityGate:
    return PriorityGate(live_topics=[IN], bulk_topics=[BULK], max_live_lag=1, max_downstream=0)


def test_the_priority_gate_keeps_backfill_paused_through_a_back_off() -> None:
    logs = {
        (IN, 0): messages(IN, 0, [b"l0", b"l1", b"l2", b"l3"]),
        (BULK, 0): messages(BULK, 0, [b"b0", b"b1"]),
    }
    s = setup(logs, stage=Echo(unavailable=1), priority=_gate(), batch_size=1)
    s.run()  # live l0 -> sink outage: everything paused by the back-off
    assert s.consumer.paused == {(IN, 0), (BULK, 0)}
    s.clock.now += 1.0
    s.run()  # back-off over; live lag is 3 > 1: backfill still held by the gate
    assert s.runner.pauses.held_by("priority") == {(BULK, 0)}
    assert s.consumer.paused == {(BULK, 0)}
    s.run(3)
    assert s.values() == [b"l0", b"l1", b"l2", b"l3"]
    s.run(3)  # live drained: the gate lets the backfill in
    assert s.values()[4:] == [b"b0", b"b1"]


def test_the_priority_gate_is_given_the_downstream_reading_and_the_time() -> None:
    seen: list[tuple[Reading | None, float]] = []

    class Spy(PriorityGate):
        def decide(self, **kwargs: Any) -> set[tuple[str, int]]:
            seen.append((kwargs["reading"], kwargs["now"]))
            return super().decide(**kwargs)

    reading = Reading(backlog=5, admitted_before=0, taken_at=999.0)
    gate = Spy(live_topics=[IN], bulk_topics=[BULK], max_live_lag=100, max_downstream=1)
    logs = {(IN, 0): messages(IN, 0, []), (BULK, 0): messages(BULK, 0, [b"b0"])}
    s = setup(logs, priority=gate, downstream=lambda: reading)
    s.run()
    assert seen == [(reading, 1000.0)]
    assert s.consumer.paused == {(BULK, 0)}  # 5 + 1 admitted >= 1: downstream full


def test_the_running_context_spans_the_run() -> None:
    events: list[str] = []

    class Running:
        def __enter__(self) -> None:
            events.append("enter")

        def __exit__(self, *exc: object) -> None:
            events.append("exit")

    stop = threading.Event()
    stop.set()
    s = setup({(IN, 0): []}, running=Running())
    s.runner.run(stop)
    assert events == ["enter", "exit"]


@pytest.mark.parametrize(
    ("fatal", "code"),
    [(True, KafkaError.UNKNOWN), (False, KafkaError._FATAL)],  # _FATAL: a fenced static member
    ids=["fatal", "fenced-static-member"],
)
def test_a_fatal_consumer_error_stops_the_worker_for_a_restart(fatal: bool, code: int) -> None:
    class Error:
        def fatal(self) -> bool:
            return fatal

        def code(self) -> int:
            return code

    class Broken(Message):
        def error(self) -> Error:  # type: ignore[override]
            return Error()

    s = setup({(IN, 0): [Broken(IN, 0, 0, b"")]})
    with pytest.raises(ConsumerFailed, match="fatal consumer error"):
        s.run()

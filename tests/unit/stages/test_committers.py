"""Both committers against a stand-in producer and consumer (no broker): what is produced
and committed, and how each class of librdkafka error is handled."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
from confluent_kafka import KafkaError, KafkaException, TopicPartition

from stages.committers import AtLeastOnceCommitter, TransactionalCommitter, produce
from stages.errors import DeliveryFailed, OutputTooLarge, TransactionAborted
from stages.records import HeaderList, Output, wire_size

OUT = Output(topic="out", key=b"k", value=b"v", headers=[("h", b"1")])
OFFSETS = [TopicPartition("in", 0, 10)]


def error(
    code: int = KafkaError._FAIL,
    *,
    retriable: bool = False,
    abortable: bool = False,
    fatal: bool = False,
) -> KafkaException:
    return KafkaException(
        KafkaError(code, "test", fatal=fatal, retriable=retriable, txn_requires_abort=abortable)
    )


@dataclass
class DeliveredMessage:
    """What a delivery callback reads of a message."""

    _value: bytes
    _key: bytes | None
    _headers: HeaderList

    def value(self) -> bytes:
        return self._value

    def key(self) -> bytes | None:
        return self._key

    def headers(self) -> HeaderList:
        return self._headers


@dataclass
class Producer:
    """Queues produced records; ``flush``/``poll`` deliver them. Scripted failures:
    ``raise_on[call]`` is a list of exceptions the next calls of ``call`` raise, in order;
    ``delivery_error`` fails every delivery; ``stuck`` keeps records queued; the queue holds
    ``capacity`` records (BufferError past that, as librdkafka's queue.buffering.max.*)."""

    raise_on: dict[str, list[BaseException]] = field(default_factory=dict)
    delivery_error: KafkaError | None = None
    stuck: bool = False
    capacity: int = 1000
    queue: list[tuple[Output, Any]] = field(default_factory=list)
    delivered: list[Output] = field(default_factory=list)  # and, if transactional, committed
    in_transaction: list[Output] = field(default_factory=list)  # acknowledged, not committed
    transactional: bool = False
    calls: list[str] = field(default_factory=list)
    committed_offsets: list[TopicPartition] = field(default_factory=list)

    def _call(self, name: str) -> None:
        self.calls.append(name)
        script = self.raise_on.get(name)
        if script:
            raise script.pop(0)

    def produce(
        self, topic: str, *, value: bytes, key: bytes | None, headers: Any, on_delivery: Any
    ) -> None:
        self._call("produce")
        if len(self.queue) >= self.capacity:
            raise BufferError("Local: Queue full")
        self.queue.append((Output(topic, key, value, headers), on_delivery))

    def __len__(self) -> int:
        return len(self.queue)

    def poll(self, timeout: float) -> int:
        return self._deliver()

    def flush(self, timeout: float) -> int:
        self.calls.append("flush")
        self._deliver()
        return len(self.queue)

    def _deliver(self) -> int:
        if self.stuck:
            return 0
        done, self.queue = self.queue, []
        for output, callback in done:
            if self.delivery_error is None:
                (self.in_transaction if self.transactional else self.delivered).append(output)
            if callback is not None:
                message = DeliveredMessage(output.value, output.key, list(output.headers))
                callback(self.delivery_error, message)
        return len(done)

    def init_transactions(self, timeout: float) -> None:
        self._call("init_transactions")
        self.transactional = True

    def begin_transaction(self) -> None:
        self._call("begin_transaction")

    def send_offsets_to_transaction(self, offsets: Any, metadata: Any, timeout: float) -> None:
        self._call("send_offsets_to_transaction")
        self.committed_offsets = list(offsets)

    def commit_transaction(self, timeout: float) -> None:
        self._call("commit_transaction")
        self._deliver()
        self.delivered.extend(self.in_transaction)
        self.in_transaction.clear()

    def abort_transaction(self, timeout: float) -> None:
        self._call("abort_transaction")
        self.queue.clear()
        self.in_transaction.clear()


class Consumer:
    """Records synchronous commits in ``commits``, asynchronous ones in ``sent``."""

    def __init__(self, fail_commit: KafkaException | None = None) -> None:
        self.commits: list[list[TopicPartition]] = []
        self.sent: list[list[TopicPartition]] = []
        self.fail_commit = fail_commit

    def commit(self, *, offsets: list[TopicPartition], asynchronous: bool) -> None:
        if self.fail_commit is not None:
            raise self.fail_commit
        (self.sent if asynchronous else self.commits).append(offsets)

    def consumer_group_metadata(self) -> str:
        return "group-metadata"


def at_least_once(
    producer: Producer, consumer: Consumer | None = None, *, commit_async: bool = False
) -> AtLeastOnceCommitter:
    return AtLeastOnceCommitter(
        producer=producer,  # type: ignore[arg-type]
        consumer=consumer or Consumer(),  # type: ignore[arg-type]
        delivery_timeout_s=0.2,
        commit_async=commit_async,
    )


def offsets(commit: list[TopicPartition]) -> set[tuple[str, int, int]]:
    return {(tp.topic, tp.partition, tp.offset) for tp in commit}


# --- produce -----------------------------------------------------------------------------


def test_produce_waits_for_room_while_the_queue_drains() -> None:
    producer = Producer(capacity=1)
    producer.queue.append((OUT, None))  # full: delivering it makes room
    produce(producer, OUT, None)  # type: ignore[arg-type]
    assert producer.calls == ["produce"] * 2
    assert producer.delivered == [OUT] and [o for o, _ in producer.queue] == [OUT]


def test_produce_gives_up_when_the_queue_stays_full() -> None:
    producer = Producer(capacity=1, stuck=True)
    producer.queue.append((OUT, None))
    with pytest.raises(DeliveryFailed, match="queue full"):
        produce(producer, OUT, None, queue_timeout_s=0.1)  # type: ignore[arg-type]


def test_a_record_that_does_not_fit_the_empty_queue_is_too_large() -> None:
    producer = Producer(capacity=0)  # as a record larger than queue.buffering.max.kbytes
    with pytest.raises(OutputTooLarge) as raised:
        produce(producer, OUT, None)  # type: ignore[arg-type]
    assert raised.value.size == wire_size(OUT)
    assert producer.calls == ["produce"], "no loop on a record that can never fit"


def test_a_record_over_message_max_bytes_is_too_large() -> None:
    producer = Producer(raise_on={"produce": [error(KafkaError.MSG_SIZE_TOO_LARGE)]})
    with pytest.raises(OutputTooLarge):
        produce(producer, OUT, None)  # type: ignore[arg-type]


def test_the_size_estimate_is_not_below_what_librdkafka_counts() -> None:
    # librdkafka: 36 bytes of record overhead, key, value, and per header its name, value
    # and two varints; plus the 61-byte batch header around a record alone in its batch.
    output = Output("t", b"key", b"v" * 1000, [("name", b"value"), ("n2", None)])
    librdkafka = 36 + 3 + 1000 + (4 + 5 + 10) + (2 + 0 + 10) + 61
    assert wire_size(output) >= librdkafka


# --- at-least-once -----------------------------------------------------------------------


def test_at_least_once_commits_after_every_delivery() -> None:
    producer, consumer = Producer(), Consumer()
    at_least_once(producer, consumer).publish([OUT, OUT], OFFSETS)
    assert producer.delivered == [OUT, OUT]
    assert consumer.commits == [OFFSETS]


def test_at_least_once_commits_nothing_when_a_delivery_fails() -> None:
    producer, consumer = Producer(delivery_error=KafkaError(KafkaError._MSG_TIMED_OUT)), Consumer()
    with pytest.raises(DeliveryFailed, match="1 outputs not delivered"):
        at_least_once(producer, consumer).publish([OUT], OFFSETS)
    assert consumer.commits == []


def test_at_least_once_commits_nothing_when_records_stay_unacknowledged() -> None:
    producer, consumer = Producer(stuck=True), Consumer()
    with pytest.raises(DeliveryFailed, match="not acknowledged"):
        at_least_once(producer, consumer).publish([OUT], OFFSETS)
    assert consumer.commits == []


def test_at_least_once_reports_a_record_the_broker_refused_for_its_size() -> None:
    producer = Producer(delivery_error=KafkaError(KafkaError.MSG_SIZE_TOO_LARGE))
    consumer = Consumer()
    with pytest.raises(OutputTooLarge) as raised:
        at_least_once(producer, consumer).publish([OUT], OFFSETS)
    assert raised.value.size == wire_size(OUT)
    assert consumer.commits == []


def test_at_least_once_survives_a_failed_offset_commit() -> None:
    consumer = Consumer(fail_commit=error(KafkaError.ILLEGAL_GENERATION))
    producer = Producer()
    at_least_once(producer, consumer).publish([OUT], OFFSETS)  # delivered: only replays
    assert producer.delivered == [OUT]


def test_at_least_once_async_sends_commits_after_delivery_and_commit_makes_sure() -> None:
    producer, consumer = Producer(), Consumer()
    committer = at_least_once(producer, consumer, commit_async=True)
    committer.publish([OUT], [TopicPartition("in", 0, 1)])
    committer.publish([OUT], [TopicPartition("in", 0, 2), TopicPartition("in", 1, 7)])
    assert producer.delivered == [OUT, OUT]
    assert [offsets(c) for c in consumer.sent] == [{("in", 0, 1)}, {("in", 0, 2), ("in", 1, 7)}]
    assert consumer.commits == [], "nothing waited for"
    committer.commit()  # e.g. on revoke: the latest offset of every partition, synchronously
    assert [offsets(c) for c in consumer.commits] == [{("in", 0, 2), ("in", 1, 7)}]
    committer.commit()
    assert len(consumer.commits) == 1, "nothing new to make sure of"


def test_at_least_once_async_sends_no_commit_when_a_delivery_fails() -> None:
    producer, consumer = Producer(delivery_error=KafkaError(KafkaError._MSG_TIMED_OUT)), Consumer()
    committer = at_least_once(producer, consumer, commit_async=True)
    with pytest.raises(DeliveryFailed):
        committer.publish([OUT], OFFSETS)
    committer.close()
    assert consumer.sent == [] and consumer.commits == []


def test_at_least_once_async_close_commits_synchronously() -> None:
    producer, consumer = Producer(), Consumer()
    committer = at_least_once(producer, consumer, commit_async=True)
    committer.publish([OUT], OFFSETS)
    committer.close()
    assert [offsets(c) for c in consumer.commits] == [offsets(OFFSETS)]


def test_at_least_once_async_forgets_offsets_of_lost_partitions() -> None:
    consumer = Consumer()
    committer = at_least_once(Producer(), consumer, commit_async=True)
    committer.publish([OUT], OFFSETS)
    committer.abort()  # partitions lost: another member owns them now
    committer.commit()
    assert consumer.commits == []


# --- exactly-once ------------------------------------------------------------------------


class Factory:
    """Hands out producers; ``scripts`` configures the next ones (then clean ones)."""

    def __init__(self, *scripts: dict[str, list[BaseException]]) -> None:
        self.scripts = list(scripts)
        self.made: list[Producer] = []

    def __call__(self) -> Producer:
        producer = Producer(raise_on=self.scripts.pop(0) if self.scripts else {})
        self.made.append(producer)
        return producer


def transactional(
    factory: Callable[[], Producer],
    *,
    max_records: int = 100,
    interval_s: float = 60.0,
    commit_on_drain: bool = False,
) -> TransactionalCommitter:
    return TransactionalCommitter(
        producer_factory=factory,  # type: ignore[arg-type]
        consumer=Consumer(),  # type: ignore[arg-type]
        max_records=max_records,
        max_interval_s=interval_s,
        timeout_s=1.0,
        commit_on_drain=commit_on_drain,
    )


def test_one_transaction_spans_batches_until_commit() -> None:
    factory = Factory()
    committer = transactional(factory)
    committer.publish([OUT], [TopicPartition("in", 0, 1)])
    committer.publish([OUT], [TopicPartition("in", 0, 2), TopicPartition("in", 1, 7)])
    [producer] = factory.made
    assert producer.calls == ["init_transactions", "begin_transaction", "produce", "produce"]
    assert committer.commit_due_in() is not None
    committer.commit()
    assert {(tp.topic, tp.partition, tp.offset) for tp in producer.committed_offsets} == {
        ("in", 0, 2),
        ("in", 1, 7),
    }
    assert producer.delivered == [OUT, OUT]
    assert committer.commit_due_in() is None


def test_a_full_transaction_commits_at_once() -> None:
    factory = Factory()
    transactional(factory, max_records=2).publish([OUT, OUT], OFFSETS)
    assert factory.made[0].calls[-1] == "commit_transaction"


def test_a_drained_batch_commits_when_commit_on_drain() -> None:
    factory = Factory()
    committer = transactional(factory, commit_on_drain=True)
    committer.publish([OUT], OFFSETS)  # more is waiting: the transaction stays open
    assert committer.commit_due_in() is not None
    committer.publish([OUT], OFFSETS, drained=True)
    assert committer.commit_due_in() is None
    assert factory.made[0].calls[-1] == "commit_transaction"
    assert factory.made[0].delivered == [OUT, OUT]


def test_a_drained_batch_waits_for_the_cadence_without_commit_on_drain() -> None:
    factory = Factory()
    committer = transactional(factory)
    committer.publish([OUT], OFFSETS, drained=True)
    assert "commit_transaction" not in factory.made[0].calls
    assert committer.commit_due_in() is not None


def test_a_commit_waits_for_the_outputs_before_adding_the_offsets() -> None:
    # AddOffsetsToTxn while an AddPartitionsToTxn is in flight is answered
    # CONCURRENT_TRANSACTIONS, and librdkafka retries it only after retry.backoff.ms.
    factory = Factory()
    committer = transactional(factory)
    committer.publish([OUT], OFFSETS)
    committer.commit()
    calls = factory.made[0].calls
    assert calls[-3:] == ["flush", "send_offsets_to_transaction", "commit_transaction"]


def test_a_retriable_commit_error_is_retried() -> None:
    factory = Factory({"commit_transaction": [error(retriable=True)]})
    committer = transactional(factory)
    committer.publish([OUT], OFFSETS)
    committer.commit()
    [producer] = factory.made
    assert producer.calls.count("commit_transaction") == 2
    assert producer.delivered == [OUT]


def test_an_abortable_error_aborts_and_says_rewind() -> None:
    factory = Factory({"commit_transaction": [error(abortable=True)]})
    committer = transactional(factory)
    committer.publish([OUT], OFFSETS)
    with pytest.raises(TransactionAborted):
        committer.commit()
    [producer] = factory.made
    assert producer.calls[-1] == "abort_transaction"
    assert producer.delivered == []
    committer.publish([OUT], OFFSETS)  # a new transaction begins
    assert producer.calls[-2:] == ["begin_transaction", "produce"]


def test_a_fatal_error_replaces_the_producer_and_says_rewind() -> None:
    factory = Factory({"send_offsets_to_transaction": [error(KafkaError._FENCED, fatal=True)]})
    committer = transactional(factory)
    committer.publish([OUT], OFFSETS)
    with pytest.raises(TransactionAborted):
        committer.commit()
    assert len(factory.made) == 2, "a fenced or fatal producer is never used again"
    assert "abort_transaction" not in factory.made[0].calls
    committer.publish([OUT], OFFSETS)
    assert factory.made[1].calls == ["init_transactions", "begin_transaction", "produce"]


def test_an_abort_that_fails_replaces_the_producer() -> None:
    factory = Factory(
        {"commit_transaction": [error(abortable=True)], "abort_transaction": [error()]}
    )
    committer = transactional(factory)
    committer.publish([OUT], OFFSETS)
    with pytest.raises(TransactionAborted):
        committer.commit()
    assert len(factory.made) == 2


def test_a_record_refused_for_its_size_aborts_the_transaction() -> None:
    size_error = error(KafkaError.MSG_SIZE_TOO_LARGE)
    factory = Factory({"produce": [KafkaException(KafkaError(0)), size_error]})
    factory.scripts[0]["produce"].pop(0)  # the first produce succeeds
    committer = transactional(factory)
    with pytest.raises(OutputTooLarge):
        committer.publish([OUT, OUT], OFFSETS)
    [producer] = factory.made
    assert producer.calls[-1] == "abort_transaction"
    assert producer.queue == [] and producer.delivered == []
    assert committer.commit_due_in() is None, "nothing left open"


def test_a_delivery_refused_for_its_size_makes_the_abort_say_so() -> None:
    factory = Factory({"commit_transaction": [error(abortable=True)]})
    committer = transactional(factory)
    committer.publish([OUT], OFFSETS)
    producer = factory.made[0]
    producer.delivery_error = KafkaError(KafkaError.MSG_SIZE_TOO_LARGE)
    producer._deliver()  # the broker refused it before the commit
    with pytest.raises(OutputTooLarge) as raised:
        committer.commit()
    assert raised.value.size == wire_size(OUT)


def test_a_full_queue_that_never_drains_aborts_instead_of_looping() -> None:
    factory = Factory()
    committer = transactional(factory)
    producer = factory.made[0]
    producer.queue.append((OUT, None))
    producer.capacity, producer.stuck = 1, True
    with pytest.raises(TransactionAborted, match="queue full"):
        committer.publish([OUT], OFFSETS)
    assert producer.calls[-1] == "abort_transaction"


def test_init_transactions_is_retried_while_retriable() -> None:
    factory = Factory({"init_transactions": [error(retriable=True), error(retriable=True)]})
    transactional(factory)
    assert factory.made[0].calls == ["init_transactions"] * 3


def test_close_commits_and_survives_an_abort() -> None:
    factory = Factory()
    committer = transactional(factory)
    committer.publish([OUT], OFFSETS)
    committer.close()
    assert factory.made[0].delivered == [OUT]
    failing = Factory({"commit_transaction": [error(abortable=True)]})
    committer = transactional(failing)
    committer.publish([OUT], OFFSETS)
    committer.close()  # logged: the next owner reprocesses from the committed offsets
    assert failing.made[0].calls[-1] == "abort_transaction"

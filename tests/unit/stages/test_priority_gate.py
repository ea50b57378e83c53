"""The live-first gate's decisions (a pure function of its inputs, no broker), and how the
live lag is read from a stand-in consumer.

What the gate does against a real broker is in tests/integration/stages/test_priority.py
and test_priority_restart.py."""

from __future__ import annotations

from typing import Any

import pytest
from confluent_kafka import OFFSET_INVALID, KafkaError, KafkaException, TopicPartition

from stages.priority import DownstreamBacklog, LiveLag, LiveLagReader, PriorityGate, Reading

LIVE, BULK = "live", "bulk"
ASSIGNED = {(LIVE, 0), (BULK, 0)}
PAUSE_BULK = {(BULK, 0)}


def gate(**kwargs: Any) -> PriorityGate:
    settings: dict[str, Any] = {"max_live_lag": 100, "max_downstream": 1000}
    settings.update(kwargs)
    return PriorityGate(live_topics=[LIVE], bulk_topics=[BULK], **settings)


def decide(
    g: PriorityGate,
    *,
    lag: int | None = 0,
    end: int = 0,
    reading: Reading | None = None,
    now: float = 100.0,
    assigned: set[tuple[str, int]] = ASSIGNED,
) -> set[tuple[str, int]]:
    return g.decide(assigned=assigned, live=LiveLag(lag, end), reading=reading, now=now)


def test_live_lag_pauses_backfill_until_it_is_under_half() -> None:
    g = gate()
    assert decide(g, lag=101) == PAUSE_BULK
    assert decide(g, lag=61) == PAUSE_BULK  # above half: still paused (no flapping)
    assert decide(g, lag=50) == set()
    assert decide(g, lag=99) == set()  # under the limit: stays open


def test_backfill_waits_until_the_live_backlog_is_known() -> None:
    g = gate()
    assert decide(g, lag=None) == PAUSE_BULK
    assert decide(g, lag=0) == set()


def test_a_full_downstream_pauses_backfill_even_without_live_lag() -> None:
    g = gate()
    reading = Reading(backlog=999, admitted_before=0, taken_at=100.0)
    g.admit([LIVE] * 5)  # live records are not backfill admitted
    assert decide(g, reading=reading) == set()
    g.admit([BULK])  # 999 + 1 let in since the reading
    assert decide(g, reading=reading) == PAUSE_BULK
    assert g.in_flight(reading, now=100.0) == 1000


def test_records_let_in_after_a_reading_count_until_the_next_one() -> None:
    g = gate()
    g.admit([BULK] * 1500)  # one big batch after a reading of 0
    assert decide(g, reading=Reading(0, 0, taken_at=100.0)) == PAUSE_BULK
    # Downstream did 900 of them: 600 left, above half of 1,000: stays paused.
    assert decide(g, reading=Reading(600, 1500, taken_at=100.0)) == PAUSE_BULK
    assert decide(g, reading=Reading(400, 1500, taken_at=100.0)) == set()


def test_an_old_reading_does_not_block_backfill_forever() -> None:
    g = gate(stale_after_s=10.0)
    reading = Reading(backlog=50_000, admitted_before=0, taken_at=89.0)
    assert decide(g, reading=reading, now=98.0) == PAUSE_BULK  # 9 s old: still believed
    assert g.in_flight(reading, now=100.0) is None  # 11 s old
    assert decide(g, reading=reading, now=100.0) == set()


@pytest.mark.parametrize(("live_flowing", "paused"), [(True, PAUSE_BULK), (False, set())])
def test_the_downstream_limit_is_looser_while_no_live_request_comes(
    live_flowing: bool, paused: set[tuple[str, int]]
) -> None:
    g = gate(max_downstream=1000, max_downstream_idle=5000, live_idle_s=60.0)
    decide(g, end=0)  # first look at the live end offsets: not yet traffic
    end = 10 if live_flowing else 0  # arrived (and consumed: no lag) or not
    assert decide(g, end=end, reading=Reading(3000, 0, taken_at=100.0)) == paused


def test_the_idle_limit_comes_back_once_live_traffic_stops() -> None:
    g = gate(max_downstream=1000, max_downstream_idle=5000, live_idle_s=5.0)
    decide(g, end=0, now=0.0)
    reading = Reading(1200, 0, taken_at=0.0)
    assert decide(g, end=10, reading=reading, now=1.0) == PAUSE_BULK  # live seen at t=1
    reading = Reading(1200, 0, taken_at=7.0)
    assert decide(g, end=10, reading=reading, now=7.0) == set()  # none for 6 s


def test_no_bulk_partition_assigned_means_nothing_to_pause() -> None:
    g = gate()
    reading = Reading(10_000, 0, taken_at=100.0)
    assert decide(g, lag=None, reading=reading, assigned={(LIVE, 0)}) == set()


def test_every_assigned_bulk_partition_is_paused() -> None:
    assigned = {(LIVE, 0), (BULK, 0), (BULK, 1), ("other", 0)}
    assert decide(gate(), lag=500, assigned=assigned) == {(BULK, 0), (BULK, 1)}


def test_live_traffic_in_flight_does_not_eat_the_backfill_allowance() -> None:
    g = gate(max_downstream=200, live_idle_s=60.0)
    decide(g, end=0, now=0.0)
    decide(g, end=3000, now=1.0)  # 3,000 live records/s: ~300 of them downstream
    assert g.live_rate == 3000
    assert decide(g, end=3005, reading=Reading(450, 0, taken_at=1.5), now=1.5) == set()
    # 300 live + 220 backfill: over the 200 backfill may add.
    assert decide(g, end=3010, reading=Reading(520, 0, taken_at=1.6), now=1.6) == PAUSE_BULK


class Consumer:
    """Positions, cached watermarks and committed offsets set by the test."""

    def __init__(self) -> None:
        self.positions: dict[tuple[str, int], int] = {}
        self.watermarks: dict[tuple[str, int], tuple[int, int]] = {}
        self.committed_offsets: dict[tuple[str, int], int] = {}
        self.committed_calls = 0
        self.committed_error: KafkaException | None = None

    def position(self, partitions: list[TopicPartition]) -> list[TopicPartition]:
        return [
            TopicPartition(tp.topic, tp.partition, self.positions.get(_key(tp), OFFSET_INVALID))
            for tp in partitions
        ]

    def get_watermark_offsets(self, tp: TopicPartition, cached: bool) -> tuple[int, int]:
        assert cached, "the gate must not ask the broker on every batch"
        return self.watermarks.get(_key(tp), (OFFSET_INVALID, OFFSET_INVALID))

    def committed(self, partitions: list[TopicPartition], timeout: float) -> list[TopicPartition]:
        self.committed_calls += 1
        if self.committed_error is not None:
            raise self.committed_error
        return [
            TopicPartition(tp.topic, tp.partition, self.committed_offsets.get(_key(tp), -1001))
            for tp in partitions
        ]


def _key(tp: TopicPartition) -> tuple[str, int]:
    return (tp.topic, tp.partition)


def reader(consumer: Consumer) -> LiveLagReader:
    return LiveLagReader(consumer)  # a stand-in: only the calls above


def test_lag_is_the_end_minus_the_position() -> None:
    consumer = Consumer()
    consumer.positions = {(LIVE, 0): 40, (LIVE, 1): 5}
    consumer.watermarks = {(LIVE, 0): (0, 100), (LIVE, 1): (0, 5)}
    assert reader(consumer).read([(LIVE, 0), (LIVE, 1)]) == LiveLag(lag=60, end=105)
    assert consumer.committed_calls == 0


def test_a_partition_not_fetched_yet_has_an_unknown_lag() -> None:
    consumer = Consumer()
    consumer.positions = {(LIVE, 0): 3}
    consumer.watermarks = {(LIVE, 0): (0, 3)}  # (LIVE, 1): no fetch response yet
    assert reader(consumer).read([(LIVE, 0), (LIVE, 1)]).lag is None


def test_a_consumed_history_is_no_backlog_after_a_restart() -> None:
    """Issue 11 item 9: the member was restarted; the live partitions hold 30,000 records,
    all consumed and committed, and none has come since, so the consumer reports no
    position. Their lag is 0, not their whole history."""
    consumer = Consumer()
    consumer.watermarks = {(LIVE, 0): (0, 15_000), (LIVE, 1): (0, 15_000)}
    consumer.committed_offsets = {(LIVE, 0): 15_000, (LIVE, 1): 14_990}
    live = reader(consumer)
    assert live.read([(LIVE, 0), (LIVE, 1)]) == LiveLag(lag=10, end=30_000)
    assert live.read([(LIVE, 0), (LIVE, 1)]) == LiveLag(lag=10, end=30_000)
    assert consumer.committed_calls == 1, "committed offsets are asked once, not per batch"


def test_without_a_commit_the_whole_partition_is_backlog() -> None:
    consumer = Consumer()  # a new group: auto.offset.reset=earliest reads it all
    consumer.watermarks = {(LIVE, 0): (20, 500)}
    assert reader(consumer).read([(LIVE, 0)]).lag == 480


def test_a_trickle_on_one_partition_leaves_the_others_known() -> None:
    consumer = Consumer()
    consumer.watermarks = {(LIVE, 0): (0, 1000), (LIVE, 1): (0, 1000)}
    consumer.committed_offsets = {(LIVE, 0): 1000, (LIVE, 1): 990}
    live = reader(consumer)
    assert live.read([(LIVE, 0), (LIVE, 1)]).lag == 10
    consumer.positions[(LIVE, 1)] = 1003  # records arrived on partition 1 and were consumed
    consumer.watermarks[(LIVE, 1)] = (0, 1003)
    assert live.read([(LIVE, 0), (LIVE, 1)]) == LiveLag(lag=0, end=2003)
    assert consumer.committed_calls == 1


def test_an_unreadable_committed_offset_is_unknown_and_asked_again() -> None:
    consumer = Consumer()
    consumer.watermarks = {(LIVE, 0): (0, 50)}
    consumer.committed_offsets = {(LIVE, 0): 50}
    consumer.committed_error = KafkaException(KafkaError(KafkaError._TIMED_OUT))
    live = reader(consumer)
    assert live.read([(LIVE, 0)]).lag is None
    consumer.committed_error = None
    assert live.read([(LIVE, 0)]).lag == 0


def test_a_revoked_partition_is_asked_again_when_assigned_again() -> None:
    consumer = Consumer()
    consumer.watermarks = {(LIVE, 0): (0, 50)}
    consumer.committed_offsets = {(LIVE, 0): 50}
    live = reader(consumer)
    assert live.read([(LIVE, 0)]).lag == 0
    live.forget([(LIVE, 0)])
    consumer.committed_offsets[(LIVE, 0)] = 20  # another member rewound it, say
    assert live.read([(LIVE, 0)]).lag == 30
    assert consumer.committed_calls == 2


class _Hop:
    """One watched (group, topic) with one partition: its end offset and the group's
    committed offset; ``before_end`` runs before the end offset is answered (a record
    moving meanwhile)."""

    def __init__(self, topic: str, end: int, committed: int) -> None:
        self.topic, self.end, self.at = topic, end, committed
        self.before_end: list[Any] = []

    def list_topics(self, topic: str, timeout: float) -> Any:
        from types import SimpleNamespace

        found = SimpleNamespace(partitions={0: None}, error=None)
        return SimpleNamespace(topics={topic: found})

    def offsets_for_times(self, parts: list[TopicPartition], timeout: float) -> Any:
        while self.before_end:
            self.before_end.pop(0)()
        return [TopicPartition(tp.topic, tp.partition, self.end) for tp in parts]

    def committed(self, parts: list[TopicPartition], timeout: float) -> Any:
        return [TopicPartition(tp.topic, tp.partition, self.at) for tp in parts]

    def close(self) -> None:
        pass


def _backlog(infer: _Hop, persist: _Hop) -> DownstreamBacklog:
    return DownstreamBacklog(
        consumers={"infer": infer, "persist": persist},  # type: ignore[dict-item]
        watch=[("infer", infer.topic), ("persist", persist.topic)],
        interval_s=0.1,
    )


def test_a_reading_is_the_sum_of_the_hops_lags() -> None:
    assert _backlog(_Hop("validated", 1000, 600), _Hop("results", 600, 500)).read() == 500


def test_a_record_crossing_a_hop_during_a_reading_is_not_counted_twice() -> None:
    infer, persist = _Hop("validated", 1000, 600), _Hop("results", 600, 500)

    def infer_commits_200() -> None:  # after infer's lag was read, before results' end
        infer.at += 200
        persist.end += 200

    persist.before_end.append(infer_commits_200)
    # Taken once: 400 + 300 = 700, the 200 counted in both hops. Taken again: 200 + 300.
    assert _backlog(infer, persist).read() == 500

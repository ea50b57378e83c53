"""The live-first gate's decisions, with a stand-in consumer (no broker).

What the gate does against a real broker is in tests/integration/test_priority.py."""

from __future__ import annotations

import time
from typing import Any

import pytest
from confluent_kafka import TopicPartition

from stages.priority import DownstreamBacklog, PriorityGate, Reading

LIVE, BULK = "live", "bulk"
ASSIGNED = {(LIVE, 0), (BULK, 0)}


class Consumer:
    """Positions and cached watermarks set by the test; records pause/resume calls."""

    def __init__(self) -> None:
        self.positions = {LIVE: 0, BULK: 0}
        self.ends = {LIVE: 0, BULK: 0}
        self.paused: set[str] = set()

    def position(self, partitions: list[TopicPartition]) -> list[TopicPartition]:
        return [
            TopicPartition(tp.topic, tp.partition, self.positions[tp.topic]) for tp in partitions
        ]

    def get_watermark_offsets(self, tp: TopicPartition, cached: bool) -> tuple[int, int]:
        assert cached, "the gate must not ask the broker on every batch"
        return 0, self.ends[tp.topic]

    def pause(self, partitions: list[TopicPartition]) -> None:
        self.paused.update(tp.topic for tp in partitions)

    def resume(self, partitions: list[TopicPartition]) -> None:
        self.paused.difference_update(tp.topic for tp in partitions)


class Backlog(DownstreamBacklog):
    """A downstream reading the test sets by hand (no thread, no admin client)."""

    def __init__(self) -> None:
        self.latest: Reading | None = None

    def start(self, admitted: Any) -> None:
        pass

    def close(self) -> None:
        pass

    def set(self, backlog: int, admitted_before: int, age_s: float = 0.0) -> None:
        self.latest = Reading(backlog, admitted_before, time.monotonic() - age_s)


def gate(backlog: Backlog | None = None, **kwargs: Any) -> PriorityGate:
    settings: dict[str, Any] = {"max_live_lag": 100, "max_downstream": 1000}
    settings.update(kwargs)
    return PriorityGate(live_topics=[LIVE], bulk_topics=[BULK], downstream=backlog, **settings)


def test_live_lag_pauses_backfill_until_it_is_under_half() -> None:
    consumer, g = Consumer(), gate()
    consumer.ends[LIVE] = 101
    g.update(consumer, ASSIGNED)
    assert consumer.paused == {BULK}
    consumer.positions[LIVE] = 40  # lag 61: above half, still paused (no flapping)
    g.update(consumer, ASSIGNED)
    assert consumer.paused == {BULK}
    consumer.positions[LIVE] = 51  # lag 50
    g.update(consumer, ASSIGNED)
    assert consumer.paused == set()


def test_backfill_waits_until_the_live_backlog_is_known() -> None:
    consumer, g = Consumer(), gate()
    consumer.ends[LIVE] = -1  # librdkafka's cached watermark before the first fetch
    g.update(consumer, ASSIGNED)
    assert consumer.paused == {BULK}
    consumer.ends[LIVE] = 0  # fetched: nothing waiting
    g.update(consumer, ASSIGNED)
    assert consumer.paused == set()


def test_a_full_downstream_pauses_backfill_even_without_live_lag() -> None:
    consumer, backlog = Consumer(), Backlog()
    g = gate(backlog)
    backlog.set(backlog=999, admitted_before=0)
    g.update(consumer, ASSIGNED, [LIVE] * 5)  # live records are not backfill admitted
    assert consumer.paused == set()
    g.update(consumer, ASSIGNED, [BULK])  # 999 + 1 let in since the reading
    assert consumer.paused == {BULK}
    assert g.in_flight() == 1000


def test_records_let_in_after_a_reading_count_until_the_next_one() -> None:
    consumer, backlog = Consumer(), Backlog()
    g = gate(backlog)
    backlog.set(backlog=0, admitted_before=0)
    g.update(consumer, ASSIGNED, [BULK] * 1500)  # one big batch, reading now stale in effect
    assert consumer.paused == {BULK}
    backlog.set(backlog=600, admitted_before=1500)  # downstream did 900 of them
    g.update(consumer, ASSIGNED)  # 600: above half of 1,000, stays paused
    assert consumer.paused == {BULK}
    backlog.set(backlog=400, admitted_before=1500)
    g.update(consumer, ASSIGNED)
    assert consumer.paused == set()


def test_an_old_reading_does_not_block_backfill_forever() -> None:
    consumer, backlog = Consumer(), Backlog()
    g = gate(backlog, stale_after_s=10.0)
    backlog.set(backlog=50_000, admitted_before=0, age_s=11.0)
    g.update(consumer, ASSIGNED)
    assert g.in_flight() is None
    assert consumer.paused == set()


@pytest.mark.parametrize(("live_flowing", "paused"), [(True, {BULK}), (False, set())])
def test_the_downstream_limit_is_looser_while_no_live_request_comes(
    live_flowing: bool, paused: set[str]
) -> None:
    consumer, backlog = Consumer(), Backlog()
    g = gate(backlog, max_downstream=1000, max_downstream_idle=5000, live_idle_s=60.0)
    g.update(consumer, ASSIGNED)  # first look at the live end offsets: not yet traffic
    if live_flowing:
        consumer.ends[LIVE] = consumer.positions[LIVE] = 10  # arrived, consumed: no lag
    backlog.set(backlog=3000, admitted_before=0)
    g.update(consumer, ASSIGNED)
    assert consumer.paused == paused


def test_no_bulk_partition_assigned_means_nothing_to_pause() -> None:
    consumer, backlog = Consumer(), Backlog()
    g = gate(backlog)
    backlog.set(backlog=10_000, admitted_before=0)
    g.update(consumer, {(LIVE, 0)})
    assert consumer.paused == set()


def test_live_traffic_in_flight_does_not_eat_the_backfill_allowance() -> None:
    consumer, backlog = Consumer(), Backlog()
    g = gate(backlog, max_downstream=200, live_idle_s=60.0)
    g._measure_live_rate(0.0, 0)
    g._measure_live_rate(1.0, 3000)  # 3,000 live records/s: ~300 of them downstream
    assert g.live_rate == 3000
    g.update(consumer, ASSIGNED)
    consumer.ends[LIVE] = consumer.positions[LIVE] = 5  # live arriving, no lag
    backlog.set(backlog=450, admitted_before=0)  # 300 live + 150 backfill
    g.update(consumer, ASSIGNED)
    assert consumer.paused == set()
    backlog.set(backlog=520, admitted_before=0)  # 300 live + 220 backfill
    g.update(consumer, ASSIGNED)
    assert consumer.paused == {BULK}

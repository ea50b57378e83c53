"""End offsets, watermarks and group backlog, against a consumer that answers from a table."""

from __future__ import annotations

from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

from confluent_kafka import Consumer, TopicPartition

from kafkaio.offsets import (
    committed_starts,
    end_offsets,
    end_offsets_total,
    group_backlog,
    latest_offsets,
    offsets_at,
    partitions,
    watermarks,
)


@dataclass
class TableConsumer:
    """Partitions' (low, high) watermarks, committed offsets and time-index answers."""

    marks: dict[int, tuple[int, int]]
    committed_at: dict[int, int] = field(default_factory=dict)
    by_time: dict[int, int] = field(default_factory=dict)
    topic: str = "t"

    def list_topics(self, topic: str, timeout: float) -> Any:
        found = SimpleNamespace(partitions={p: None for p in self.marks}, error=None)
        return SimpleNamespace(topics={self.topic: found} if self.marks else {})

    def get_watermark_offsets(self, tp: TopicPartition, timeout: float) -> tuple[int, int]:
        return self.marks[tp.partition]

    def committed(self, parts: list[TopicPartition], timeout: float) -> list[TopicPartition]:
        return [
            TopicPartition(tp.topic, tp.partition, self.committed_at.get(tp.partition, -1001))
            for tp in parts
        ]

    def offsets_for_times(
        self, parts: list[TopicPartition], timeout: float
    ) -> list[TopicPartition]:
        # Kafka's ListOffsets: -1 asks the end offset, -2 the earliest, others the time index.
        special = {-1: 1, -2: 0}
        return [
            TopicPartition(
                tp.topic,
                tp.partition,
                self.marks[tp.partition][special[tp.offset]]
                if tp.offset in special
                else self.by_time.get(tp.partition, -1),
            )
            for tp in parts
        ]


def consumer(table: TableConsumer) -> Consumer:
    return table  # type: ignore[return-value]  # duck-typed stand-in for the C class


def test_a_missing_topic_has_no_partitions() -> None:
    empty = consumer(TableConsumer(marks={}))
    assert partitions(empty, "t") == [] and end_offsets_total(empty, "t") == 0


def test_end_offsets_and_their_sum() -> None:
    table = consumer(TableConsumer(marks={1: (5, 9), 0: (0, 3)}))
    assert partitions(table, "t") == [0, 1]
    assert watermarks(table, "t") == {0: (0, 3), 1: (5, 9)}
    assert end_offsets(table, "t") == {0: 3, 1: 9}
    assert end_offsets_total(table, "t") == 12


def test_offsets_at_a_time_fall_back_to_the_end() -> None:
    table = consumer(TableConsumer(marks={0: (0, 3), 1: (0, 9)}, by_time={0: 2}))
    assert offsets_at(table, "t", 1_000) == {0: 2, 1: 9}


def test_group_backlog_counts_a_never_committed_partition_from_its_start() -> None:
    table = consumer(
        TableConsumer(marks={0: (0, 10), 1: (4, 10), 2: (0, 5)}, committed_at={0: 7, 2: 5})
    )
    assert group_backlog(table, "t") == {0: 3, 1: 6, 2: 0}


def test_latest_offsets_and_committed_starts_ask_for_the_given_partitions_only() -> None:
    table = consumer(TableConsumer(marks={0: (2, 10), 1: (4, 12)}, committed_at={0: 7}))
    assert latest_offsets(table, "t", [1]) == {1: 12}
    assert committed_starts(table, "t", [0, 1]) == {0: 7, 1: 4}
    assert latest_offsets(table, "t", []) == {} and committed_starts(table, "t", []) == {}

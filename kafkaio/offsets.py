"""A topic's partitions and offsets: watermarks, end offsets, offsets at a time, group lag.

Every reader of "how far does this topic go" (backfill and export windows, the demo, the
``results`` CLI, the benchmarks, the tests) asks through these functions. End offsets count
every offset written, transaction markers included, so they bound what there is to read; they
are not a count of records.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Final, Protocol

from confluent_kafka import OFFSET_BEGINNING, OFFSET_END, Consumer, TopicPartition

META_TIMEOUT_S: Final = 10.0


class HasMetadata(Protocol):
    """Any client that answers metadata requests (consumer, producer, admin client)."""

    def list_topics(self, topic: str | None = ..., timeout: float = ...) -> Any: ...


def partitions(client: HasMetadata, topic: str, *, timeout_s: float = META_TIMEOUT_S) -> list[int]:
    """Partition numbers of ``topic``, sorted; empty when the topic does not exist."""
    found = client.list_topics(topic, timeout=timeout_s).topics.get(topic)
    if found is None or found.error is not None:
        return []
    return sorted(found.partitions)


def watermarks(
    consumer: Consumer, topic: str, *, timeout_s: float = META_TIMEOUT_S
) -> dict[int, tuple[int, int]]:
    """Per partition, (low, high) offsets right now (asked of the broker, not cached)."""
    return {
        p: consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=timeout_s)
        for p in partitions(consumer, topic, timeout_s=timeout_s)
    }


def end_offsets(
    consumer: Consumer, topic: str, *, timeout_s: float = META_TIMEOUT_S
) -> dict[int, int]:
    """Per partition, the offset the next record will get."""
    return {p: high for p, (_low, high) in watermarks(consumer, topic, timeout_s=timeout_s).items()}


def end_offsets_total(consumer: Consumer, topic: str, *, timeout_s: float = META_TIMEOUT_S) -> int:
    """The sum of ``topic``'s end offsets: grows by one per record (and transaction marker)."""
    return sum(end_offsets(consumer, topic, timeout_s=timeout_s).values())


def offsets_at(
    consumer: Consumer, topic: str, timestamp_ms: int, *, timeout_s: float = META_TIMEOUT_S
) -> dict[int, int]:
    """Per partition, the first offset whose timestamp is at or after ``timestamp_ms``
    (Kafka's time index, ``offsets_for_times``); the end offset when there is none."""
    marks = watermarks(consumer, topic, timeout_s=timeout_s)
    wanted = [TopicPartition(topic, p, timestamp_ms) for p in marks]
    found = consumer.offsets_for_times(wanted, timeout=timeout_s) if wanted else []
    return {tp.partition: marks[tp.partition][1] if tp.offset < 0 else tp.offset for tp in found}


def latest_offsets(
    consumer: Consumer,
    topic: str,
    numbers: Sequence[int],
    *,
    timeout_s: float = META_TIMEOUT_S,
) -> dict[int, int]:
    """Per partition in ``numbers``, the end offset, in one ListOffsets request for all of
    them (``get_watermark_offsets`` sends one per partition). It follows the consumer's
    ``isolation.level``: read_committed answers the last stable offset, before any open
    transaction."""
    wanted = [TopicPartition(topic, p, OFFSET_END) for p in numbers]
    found = consumer.offsets_for_times(wanted, timeout=timeout_s) if wanted else []
    return {tp.partition: tp.offset for tp in found}


def committed_starts(
    consumer: Consumer,
    topic: str,
    numbers: Sequence[int],
    *,
    timeout_s: float = META_TIMEOUT_S,
) -> dict[int, int]:
    """Per partition in ``numbers``, where the consumer's group goes on from: its committed
    offset, or for a partition never committed its earliest retained record
    (``auto.offset.reset=earliest``). Reading committed offsets does not join the group."""
    parts = [TopicPartition(topic, p) for p in numbers]
    committed = consumer.committed(parts, timeout=timeout_s) if parts else []
    starts = {tp.partition: tp.offset for tp in committed if tp.offset >= 0}
    never = [
        TopicPartition(topic, tp.partition, OFFSET_BEGINNING) for tp in committed if tp.offset < 0
    ]
    if never:
        starts.update(
            (tp.partition, max(tp.offset, 0))
            for tp in consumer.offsets_for_times(never, timeout=timeout_s)
        )
    return starts


def group_backlog(
    consumer: Consumer,
    topic: str,
    *,
    numbers: Sequence[int] | None = None,
    timeout_s: float = META_TIMEOUT_S,
) -> dict[int, int]:
    """Per partition, offsets the consumer's group has still to commit: end offset minus
    :func:`committed_starts` (a partition never committed counts from its start), two
    requests, end offsets first (what the group commits in between is not counted: see
    ``stages.priority.DownstreamBacklog.read`` for why the order matters to a caller adding
    up consecutive hops). ``numbers``: the partitions to read (default: all, one metadata
    request)."""
    if numbers is None:
        numbers = partitions(consumer, topic, timeout_s=timeout_s)
    ends = latest_offsets(consumer, topic, numbers, timeout_s=timeout_s)
    starts = committed_starts(consumer, topic, numbers, timeout_s=timeout_s)
    return {p: max(0, ends[p] - starts.get(p, ends[p])) for p in numbers if p in ends}

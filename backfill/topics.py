"""Reading bounded ranges of Kafka partitions (replay, export, DLQ counts).

Readers here never join a consumer group: they ``assign`` partitions, read from start
offsets up to end offsets fixed before reading, and commit nothing. ``isolation.level`` is
``read_committed`` (the factory's default), so aborted transactional writes are never seen.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator

from confluent_kafka import OFFSET_END, Consumer, Message, TopicPartition

from kafkaio.dead_letters import read_dead_letter
from kafkaio.offsets import offsets_at

log = logging.getLogger(__name__)


class PartitionRange:
    """Reads ``[start, end)`` of each partition of ``topic``; :meth:`extend` moves the ends
    (export ``--wait`` reads on as new records arrive)."""

    def __init__(
        self, consumer: Consumer, topic: str, starts: dict[int, int], ends: dict[int, int]
    ) -> None:
        self._consumer = consumer
        self._topic = topic
        self._next = {p: starts.get(p, 0) for p in ends}
        self._ends = dict(ends)
        self._assigned: set[int] = set()

    @property
    def done(self) -> bool:
        return all(self._next[p] >= end for p, end in self._ends.items())

    @property
    def partitions(self) -> list[int]:
        return sorted(self._ends)

    def extend(self, ends: dict[int, int]) -> None:
        for p, end in ends.items():
            self._next.setdefault(p, 0)
            self._ends[p] = max(end, self._ends.get(p, 0))

    def batches(
        self, *, stall_timeout_s: float = 30.0, max_records: int = 2000
    ) -> Iterator[list[Message]]:
        """Batches of records until every partition reached its end. Raises ``TimeoutError``
        when nothing arrives for ``stall_timeout_s`` (the broker is gone)."""
        last_progress = time.monotonic()
        while not self.done:
            batch = self.read(timeout_s=0.2, max_records=max_records)
            if batch or self._skip_past_gaps():
                last_progress = time.monotonic()
            elif time.monotonic() - last_progress > stall_timeout_s:
                raise TimeoutError(f"{self._topic}: no progress for {stall_timeout_s:.0f}s")
            if batch:
                yield batch
        self._consumer.unassign()
        self._assigned.clear()

    def read(self, *, timeout_s: float, max_records: int = 2000) -> list[Message]:
        """Records inside the ranges that arrive within ``timeout_s`` (blocks until the first
        one or the timeout)."""
        self._assign_pending()
        if not self._assigned:
            return []
        batch = []
        for message in self._consumer.consume(max_records, timeout=timeout_s):
            err = message.error()
            if err is not None:
                if err.fatal():
                    raise RuntimeError(f"{self._topic}: {err}")
                log.warning("%s: %s", self._topic, err)
                continue
            p, offset = message.partition() or 0, message.offset() or 0
            if self._next.get(p, 0) <= offset < self._ends.get(p, 0):
                batch.append(message)
                self._next[p] = offset + 1
        return batch

    def _assign_pending(self) -> None:
        wanted = {p for p, end in self._ends.items() if self._next[p] < end}
        if wanted != self._assigned:
            self._consumer.assign([TopicPartition(self._topic, p, self._next[p]) for p in wanted])
            self._assigned = wanted

    def _skip_past_gaps(self) -> bool:
        """Offsets that hold no readable record (transaction markers, aborted or compacted
        records) move the consumer's position without a message: follow it."""
        moved = False
        for tp in self._consumer.position([TopicPartition(self._topic, p) for p in self._assigned]):
            if tp.offset > self._next[tp.partition] and tp.offset != OFFSET_END:
                self._next[tp.partition] = min(tp.offset, self._ends[tp.partition])
                moved = True
        return moved


class DeadLetterWatcher:
    """Counts distinct requests of one backfill in the DLQ, reading it from ``since_ms`` on
    without blocking (for the progress line)."""

    def __init__(self, consumer: Consumer, topic: str, backfill_id: str, *, since_ms: int) -> None:
        self._consumer = consumer
        self._backfill_id = backfill_id
        self.ids: set[str] = set()
        starts = offsets_at(consumer, topic, since_ms)
        consumer.assign([TopicPartition(topic, p, offset) for p, offset in starts.items()])

    def poll(self) -> int:
        for _ in range(10):  # bounded: the send loop must not stall here
            messages = self._consumer.consume(1000, timeout=0)
            for message in messages:
                head = None if message.error() else read_dead_letter(message).head
                if head is not None and head.attributes.get("backfill_id") == self._backfill_id:
                    self.ids.add(head.id)
            if not messages:
                break
        return len(self.ids)

    def close(self) -> None:
        self._consumer.close()

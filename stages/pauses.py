"""Why the runner's partitions are paused, and for how long (see :mod:`stages.runtime`).

Partitions are paused for two reasons: the back-off after a transient failure (``backoff``,
every assigned partition, for as long as :class:`Backoff` says) and the live-first rule
(``priority``, the backfill partitions; see :mod:`stages.priority`).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Literal

from confluent_kafka import Consumer, KafkaException, TopicPartition

log = logging.getLogger(__name__)
Partition = tuple[str, int]
PauseReason = Literal["backoff", "priority"]


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


class Pauses:
    """Who holds which partition paused. A partition is paused while any reason holds it
    and resumed when the last one lets go, so no component resumes another's pause."""

    def __init__(self, consumer: Consumer) -> None:
        self._consumer = consumer
        self._held: dict[PauseReason, set[Partition]] = {}

    def hold(self, reason: PauseReason, partitions: Iterable[Partition]) -> None:
        """``reason`` now holds exactly ``partitions`` (and lets go of any others)."""
        before = self.paused()
        self._held[reason] = set(partitions)
        after = self.paused()
        if after - before:
            self._consumer.pause(topic_partitions(after - before))
        if before - after:
            self._consumer.resume(topic_partitions(before - after))

    def release(self, reason: PauseReason) -> None:
        self.hold(reason, ())

    def held_by(self, reason: PauseReason) -> set[Partition]:
        return set(self._held.get(reason, ()))

    def paused(self) -> set[Partition]:
        return set().union(*self._held.values())

    def forget(self, partitions: Iterable[Partition]) -> None:
        """No longer assigned: no reason holds them any more, and they are resumed in the
        consumer too. librdkafka keeps a partition's pause flag across a lost/assigned
        cycle (cooperative-sticky): a partition paused for a back-off, lost while paused
        and assigned back stayed paused for good (found by the broker-restart fault test)."""
        gone = set(partitions)
        was_paused = self.paused() & gone
        for held in self._held.values():
            held -= gone
        if was_paused:
            try:
                self._consumer.resume(topic_partitions(was_paused))
            except KafkaException as exc:  # not ours any more: nothing left to resume
                log.debug("resume of unassigned partitions failed: %s", exc)


def topic_partitions(partitions: Iterable[Partition]) -> list[TopicPartition]:
    """``partitions`` as confluent-kafka's ``TopicPartition`` s, in a stable order."""
    return [TopicPartition(t, p) for t, p in sorted(partitions)]

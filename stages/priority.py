"""Live traffic before bulk traffic in one consumer.

The validate stage consumes the live topic (``inference.requests``) and the backfill topic.
While the live partitions have a backlog (lag above ``max_live_lag``), the gate pauses the
backfill partitions, so the next batches are live only; once the live lag is back under half
of that (hysteresis, so it does not flap), the backfill resumes. Lag is read from the
consumer's cached watermarks (updated by every fetch): no broker round trip per batch.
"""

from __future__ import annotations

import logging
from collections.abc import Collection

from confluent_kafka import Consumer, TopicPartition

log = logging.getLogger(__name__)


class PriorityGate:
    """Pauses ``bulk_topics`` partitions while ``live_topics`` partitions lag."""

    def __init__(
        self, *, live_topics: Collection[str], bulk_topics: Collection[str], max_live_lag: int
    ) -> None:
        self._live = set(live_topics)
        self._bulk = set(bulk_topics)
        self._max_lag = max_live_lag
        self.bulk_paused = False

    def update(self, consumer: Consumer, assigned: Collection[tuple[str, int]]) -> None:
        """Pause or resume the bulk partitions given the current live lag."""
        live = [TopicPartition(t, p) for t, p in assigned if t in self._live]
        bulk = [TopicPartition(t, p) for t, p in assigned if t in self._bulk]
        if not bulk:
            return
        lag = self.live_lag(consumer, live)
        if lag > self._max_lag:
            consumer.pause(bulk)  # idempotent; also covers partitions assigned since
            if not self.bulk_paused:
                log.info("live lag %d: backfill paused", lag)
            self.bulk_paused = True
        elif self.bulk_paused and lag <= self._max_lag // 2:
            consumer.resume(bulk)
            self.bulk_paused = False
            log.info("live lag %d: backfill resumed", lag)

    def reassert(self, consumer: Consumer, assigned: Collection[tuple[str, int]]) -> None:
        """Re-apply the pause after something resumed every partition (a retry)."""
        bulk = [TopicPartition(t, p) for t, p in assigned if t in self._bulk]
        if self.bulk_paused and bulk:
            consumer.pause(bulk)

    @staticmethod
    def live_lag(consumer: Consumer, live: list[TopicPartition]) -> int:
        if not live:
            return 0
        lag = 0
        for tp in consumer.position(live):
            low, high = consumer.get_watermark_offsets(tp, cached=True)
            if high < 0:
                continue  # not fetched yet: nothing known
            # Nothing consumed from it yet (fresh group): its whole content is backlog.
            start = tp.offset if tp.offset >= 0 else max(low, 0)
            lag += max(0, high - start)
        return lag

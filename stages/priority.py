"""Live traffic before bulk traffic, at every hop.

The validate stage consumes the live topic (``inference.requests``) and the backfill topic,
and it is the only place where the two kinds can be told apart cheaply: downstream, infer
and persist read one topic for both. So validate decides how much backfill enters the
pipeline, with two rules (:class:`PriorityGate`):

1. **Live first at validate.** While the live partitions have a backlog (lag above
   ``max_live_lag``), the backfill partitions are paused, so the next batches are live
   only; once the live lag is back under half of that (hysteresis, so it does not flap),
   the backfill resumes. Lag is read from the consumer's cached watermarks (updated by every
   fetch): no broker round trip per batch.
2. **A bounded backlog downstream.** Backfill is only let in while fewer than
   ``max_downstream`` records, on top of live traffic's own share (its rate times about
   0.1 s), wait in the downstream stages (infer's lag on ``inference.validated`` plus
   persist's lag on ``inference.results``). Without this rule a backfill forwarded at
   validate's speed piles up in front of infer and persist, and a live request queues
   behind tens of thousands of bulk ones there (measured: live p99 66x worse). With it, a
   live request waits behind at most about ``max_downstream`` backfill records downstream.
   While no live request has come for ``live_idle_s``, the limit is ``max_downstream_idle``:
   a backfill alone runs at full speed, but not so far ahead that the next live request
   waits long.

The downstream lag is read by :class:`DownstreamBacklog`, a background thread that asks the
broker for the groups' committed offsets and the topics' end offsets every ``interval_s``.
Between two readings the gate counts what it let in since the reading started (credit), so
a stale reading cannot let a burst through. A reading older than ``stale_after_s`` (broker
unreachable, say) is ignored rather than blocking the backfill forever.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Collection, Iterable, Sequence
from dataclasses import dataclass

from confluent_kafka import Consumer, TopicPartition

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Reading:
    """Records waiting downstream, as of ``taken_at`` (monotonic); ``admitted_before`` is
    the gate's admitted-count when the reading was started."""

    backlog: int
    admitted_before: int
    taken_at: float


class DownstreamBacklog:
    """Polls ``(group, topic)`` lags in a daemon thread; :meth:`latest` is the last reading.

    ``consumers`` maps each watched group id to a consumer configured with that group id and
    ``isolation.level=read_uncommitted`` (so end offsets include open transactions: records
    on their way are backlog too). They are never subscribed, so they do not join the group;
    they only read its committed offsets. (The AdminClient would need fewer requests, but
    librdkafka 2.16 can abort the process in an admin call while the broker restarts:
    ``rd_kafka_enq_once_del_source_return: Assertion `eonce->refcnt > 0' failed``.)

    ``admitted`` is called at the start of each reading to learn how many bulk records the
    gate had let in by then (records let in later are counted by the gate itself).
    """

    def __init__(
        self,
        *,
        consumers: dict[str, Consumer],
        watch: Sequence[tuple[str, str]],
        interval_s: float,
        timeout_s: float = 5.0,
    ) -> None:
        self._consumers = consumers
        self._watch = list(watch)
        self._interval_s = interval_s
        self._timeout_s = timeout_s
        self._partitions: dict[str, list[int]] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.latest: Reading | None = None

    def start(self, admitted: Callable[[], int]) -> None:
        self._thread = threading.Thread(
            target=self._run, args=(admitted,), name="downstream-backlog", daemon=True
        )
        self._thread.start()

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=self._timeout_s * 3)
        for consumer in self._consumers.values():
            consumer.close()

    def _run(self, admitted: Callable[[], int]) -> None:
        failing = False
        while not self._stop.is_set():
            started = time.monotonic()
            before = admitted()
            try:
                backlog = self.read()
            except Exception as exc:  # any failure: the gate falls back on staleness
                if not failing:
                    log.warning("downstream lag unreadable (%s); retrying", exc)
                failing = True
            else:
                if failing:
                    log.info("downstream lag readable again: %d", backlog)
                failing = False
                self.latest = Reading(backlog, before, time.monotonic())
            self._stop.wait(max(0.0, self._interval_s - (time.monotonic() - started)))

    def read(self) -> int:
        """One reading: sum over watched partitions of end offset minus committed offset."""
        backlog = 0
        for group, topic in self._watch:
            consumer = self._consumers[group]
            parts = [TopicPartition(topic, p) for p in self._partitions_of(consumer, topic)]
            for tp in consumer.committed(parts, timeout=self._timeout_s):
                low, high = consumer.get_watermark_offsets(tp, timeout=self._timeout_s)
                # Never committed (a new group) starts from the earliest retained record
                # (auto.offset.reset=earliest), so all of it is backlog.
                backlog += max(0, high - (tp.offset if tp.offset >= 0 else low))
        return backlog

    def _partitions_of(self, consumer: Consumer, topic: str) -> list[int]:
        """Read once (partitions are added rarely; a restart picks them up)."""
        if topic not in self._partitions:
            meta = consumer.list_topics(topic, timeout=self._timeout_s).topics[topic]
            if meta.error is not None:
                raise RuntimeError(f"{topic}: {meta.error}")
            self._partitions[topic] = sorted(meta.partitions)
        return self._partitions[topic]


# About how long a live record spends between validate's output and persist's commit (two
# transactional hops, measured 70-100 ms at 1,000 req/s): its share of the downstream backlog.
_LIVE_TRIP_S = 0.1


class PriorityGate:
    """Pauses ``bulk_topics`` partitions while ``live_topics`` partitions lag, or while the
    downstream backlog (when ``downstream`` is given) is at ``max_downstream`` or more."""

    def __init__(
        self,
        *,
        live_topics: Collection[str],
        bulk_topics: Collection[str],
        max_live_lag: int,
        downstream: DownstreamBacklog | None = None,
        max_downstream: int = 0,
        max_downstream_idle: int = 0,
        live_idle_s: float = 5.0,
        stale_after_s: float = 10.0,
    ) -> None:
        self._live = set(live_topics)
        self._bulk = set(bulk_topics)
        self._max_lag = max_live_lag
        self._downstream = downstream
        self._max_downstream = max_downstream
        self._max_downstream_idle = max(max_downstream_idle, max_downstream)
        self._live_idle_s = live_idle_s
        self._stale_after_s = stale_after_s
        self._live_blocked = False
        self._downstream_blocked = False
        self._live_end: int | None = None  # sum of the live end offsets at the last look
        self._live_seen_at = -float("inf")
        self._rate_mark: tuple[float, int] | None = None  # (when, live end offsets then)
        self.live_rate = 0.0  # live records/s arriving, over the last second or so
        self.admitted = 0  # bulk records consumed so far (read by the backlog thread)
        self.bulk_paused = False

    def start(self) -> None:
        if self._downstream is not None:
            self._downstream.start(lambda: self.admitted)

    def close(self) -> None:
        if self._downstream is not None:
            self._downstream.close()

    def update(
        self,
        consumer: Consumer,
        assigned: Collection[tuple[str, int]],
        consumed: Iterable[str] = (),
    ) -> None:
        """Count the bulk records in ``consumed`` (the topic of each record of the batch
        just consumed), then pause or resume the bulk partitions."""
        self.admitted += sum(1 for topic in consumed if topic in self._bulk)
        bulk = [TopicPartition(t, p) for t, p in assigned if t in self._bulk]
        if not bulk:
            return
        live = [TopicPartition(t, p) for t, p in assigned if t in self._live]
        lag, end = self.live_lag(consumer, live)  # lag None: not known yet
        now = time.monotonic()
        if self._live_end is not None and end != self._live_end:
            self._live_seen_at = now  # live requests arrived since the last look
        self._live_end = end
        self._measure_live_rate(now, end)
        if lag is None or lag > self._max_lag:
            # Unknown (a live partition not fetched yet, e.g. just after start or a
            # rebalance) counts as a backlog: otherwise backfill fetched first goes first.
            self._live_blocked = True
        elif lag <= self._max_lag // 2:
            self._live_blocked = False
        in_flight = self.in_flight()
        # Live traffic seen lately: keep the downstream queue short, so a live request
        # waits behind little backfill. None for a while: let the backfill run (fast), but
        # not so far ahead that the next live request waits long behind it.
        live_active = now - self._live_seen_at < self._live_idle_s
        if live_active:
            # Live requests are part of the downstream backlog too: their own share (rate x
            # about one downstream trip) is added, so the limit is what backfill may add.
            limit = self._max_downstream + int(self.live_rate * _LIVE_TRIP_S)
        else:
            limit = self._max_downstream_idle
        if in_flight is not None and in_flight >= limit:
            self._downstream_blocked = True
        elif in_flight is None or in_flight < limit // 2:
            self._downstream_blocked = False
        if self._live_blocked or self._downstream_blocked:
            consumer.pause(bulk)  # idempotent; also covers partitions assigned since
            if not self.bulk_paused:
                why = f"live lag {lag}" if self._live_blocked else f"downstream {in_flight}"
                log.debug("%s: backfill paused", why)
            self.bulk_paused = True
        elif self.bulk_paused:
            consumer.resume(bulk)
            self.bulk_paused = False
            log.debug("live lag %d, downstream %s: backfill resumed", lag, in_flight)

    def _measure_live_rate(self, now: float, end: int) -> None:
        if self._rate_mark is None or end < self._rate_mark[1]:  # first look, or reassigned
            self._rate_mark = (now, end)
            return
        since, then = self._rate_mark
        if now - since >= 1.0:
            self.live_rate = (end - then) / (now - since)
            self._rate_mark = (now, end)

    def in_flight(self) -> int | None:
        """Records waiting downstream now, counting those let in since the last reading
        started; None when there is no recent reading (or no downstream rule)."""
        if self._downstream is None:
            return None
        reading = self._downstream.latest
        if reading is None or time.monotonic() - reading.taken_at > self._stale_after_s:
            return None
        return reading.backlog + (self.admitted - reading.admitted_before)

    def reassert(self, consumer: Consumer, assigned: Collection[tuple[str, int]]) -> None:
        """Re-apply the pause after something resumed every partition (a retry)."""
        bulk = [TopicPartition(t, p) for t, p in assigned if t in self._bulk]
        if self.bulk_paused and bulk:
            consumer.pause(bulk)

    @staticmethod
    def live_lag(consumer: Consumer, live: list[TopicPartition]) -> tuple[int | None, int]:
        """(records not consumed yet, sum of end offsets) of the ``live`` partitions, from the
        watermarks cached by the last fetches; the lag is None while any of them has not
        been fetched yet."""
        lag: int | None = 0
        end = 0
        for tp in consumer.position(live) if live else []:
            low, high = consumer.get_watermark_offsets(tp, cached=True)
            if high < 0:
                lag = None  # not fetched yet: its backlog is unknown
                continue
            # Nothing consumed from it yet (fresh group): its whole content is backlog.
            start = tp.offset if tp.offset >= 0 else max(low, 0)
            if lag is not None:
                lag += max(0, high - start)
            end += high
        return lag, end

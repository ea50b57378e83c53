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

Who does what: :class:`PriorityGate` only decides (no Kafka client, no clock); the runner
reads the live lag with :class:`LiveLagReader`, hands the gate the latest reading and the
time, and holds the partitions it names paused under the reason ``priority``. The
:class:`DownstreamBacklog` thread is started and closed by whoever builds the runner.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Collection, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

from confluent_kafka import Consumer, KafkaException, TopicPartition

from kafkaio.offsets import committed_starts, latest_offsets, partitions

log = logging.getLogger(__name__)

# Tries at a reading in which no record crossed a hop boundary (DownstreamBacklog.read).
_READ_ATTEMPTS = 3


@dataclass(frozen=True)
class Reading:
    """Records waiting downstream, as of ``taken_at`` (monotonic); ``admitted_before`` is
    the gate's admitted-count when the reading was started."""

    backlog: int
    admitted_before: int
    taken_at: float


class DownstreamBacklog:
    """Polls ``(group, topic)`` lags in a daemon thread; :meth:`latest` is the last reading.

    ``consumers`` maps each watched group id to a consumer configured with that group id:
    the first hop's with ``isolation.level=read_uncommitted`` (end offsets include open
    transactions: what validate produced is on its way), later hops' ``read_committed`` (a
    record in infer's open transaction is in infer's lag already; its output above the last
    stable offset would count it twice). They are never subscribed, so they do not join the group;
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

    @contextmanager
    def running(self, admitted: Callable[[], int]) -> Iterator[None]:
        """The reading thread runs while in this block (given to the runner, which enters
        it for as long as it runs)."""
        self.start(admitted)
        try:
            yield
        finally:
            self.close()

    def reading(self) -> Reading | None:
        """The latest reading (None before the first)."""
        return self.latest

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
        """One reading: sum over watched partitions of end offset minus committed offset.

        Records move between hops while a reading is taken (a few round trips), and a
        record counted in one hop's lag and then again, a moment later, in the next one's
        made a backlog of ~450 read as 800-1,400 under load. So each hop's end offsets are
        read before its committed offsets, and after the last hop the committed offsets of
        the hops before it are read again: unchanged, nothing moved across a hop boundary
        during the reading and it stands; changed, it is taken again (a few times at most;
        the last try stands, erring high, which only holds the backfill a little longer)."""
        hops = self._hops()
        backlog = 0
        for _attempt in range(_READ_ATTEMPTS):
            backlog, starts = 0, []
            for consumer, topic, parts in hops:
                end = latest_offsets(consumer, topic, parts, timeout_s=self._timeout_s)
                start = committed_starts(consumer, topic, parts, timeout_s=self._timeout_s)
                backlog += sum(max(0, end[p] - start.get(p, end[p])) for p in parts if p in end)
                starts.append(start)
            again = [
                committed_starts(consumer, topic, parts, timeout_s=self._timeout_s)
                for consumer, topic, parts in hops[:-1]
            ]
            if again == starts[:-1]:
                break
        return backlog

    def _hops(self) -> list[tuple[Consumer, str, list[int]]]:
        return [
            (self._consumers[group], topic, self._partitions_of(self._consumers[group], topic))
            for group, topic in self._watch
        ]

    def _partitions_of(self, consumer: Consumer, topic: str) -> list[int]:
        """Read once (this runs every 0.1 s; partitions are added rarely, a restart picks
        them up)."""
        if topic not in self._partitions:
            found = partitions(consumer, topic, timeout_s=self._timeout_s)
            if not found:
                raise RuntimeError(f"{topic}: no such topic")
            self._partitions[topic] = found
        return self._partitions[topic]


@dataclass(frozen=True)
class LiveLag:
    """The live partitions' backlog: ``lag`` records not consumed yet (None while unknown)
    and ``end``, the sum of their end offsets (it grows when live requests arrive)."""

    lag: int | None
    end: int


Partition = tuple[str, int]


class LiveLagReader:
    """Reads :class:`LiveLag` from the consumer without a broker round trip per batch: the
    watermarks cached by the last fetches, and the consumer's positions.

    A partition that has delivered no record since it was assigned has no position
    (librdkafka reports ``OFFSET_INVALID`` until the application consumes from it). It is
    fetching from its committed offset, so that offset is asked once (a broker round trip,
    remembered until the partition delivers a record or is revoked). Taking the log start
    instead, as if the group were new, counted a consumed history as a live backlog for as
    long as no live request came: after a restart, the backfill never started.
    """

    def __init__(self, consumer: Consumer, *, timeout_s: float = 5.0) -> None:
        self._consumer = consumer
        self._timeout_s = timeout_s
        self._committed: dict[Partition, int] = {}

    def read(self, partitions: Collection[Partition]) -> LiveLag:
        tps = [TopicPartition(t, p) for t, p in sorted(partitions)]
        positions = self._consumer.position(tps) if tps else []
        watermarks = {
            (tp.topic, tp.partition): self._consumer.get_watermark_offsets(tp, cached=True)
            for tp in tps
        }
        starts = self._starts(positions, watermarks)
        lag: int | None = 0
        end = 0
        for key, (low, high) in watermarks.items():
            start = starts.get(key)
            end += max(high, 0)
            if high < 0 or start is None:
                lag = None  # not fetched yet (or its start is unknown): backlog unknown
            elif lag is not None:
                lag += max(0, high - max(start, low))
        return LiveLag(lag, end)

    def forget(self, partitions: Iterable[Partition]) -> None:
        """``partitions`` were revoked (or lost): a new assignment fetches from a new start."""
        for key in partitions:
            self._committed.pop(key, None)

    def _starts(
        self, positions: Sequence[TopicPartition], watermarks: dict[Partition, tuple[int, int]]
    ) -> dict[Partition, int]:
        """Where each partition is (or will be) consumed from."""
        starts: dict[Partition, int] = {}
        unknown: list[Partition] = []
        for tp in positions:
            key = (tp.topic, tp.partition)
            if tp.offset >= 0:
                starts[key] = tp.offset
                self._committed.pop(key, None)  # a rewind may leave it unknown again later
            elif key in self._committed:
                starts[key] = self._committed[key]
            elif watermarks[key][1] >= 0:  # asked only once fetching, i.e. really assigned
                unknown.append(key)
        if unknown:
            starts.update(self._ask_committed(unknown, watermarks))
        return starts

    def _ask_committed(
        self, partitions: list[Partition], watermarks: dict[Partition, tuple[int, int]]
    ) -> dict[Partition, int]:
        try:
            found = self._consumer.committed(
                [TopicPartition(t, p) for t, p in partitions], timeout=self._timeout_s
            )
        except KafkaException as exc:
            log.warning("committed offsets of the live partitions unreadable: %s", exc)
            return {}  # unknown this time; asked again on the next batch
        for tp in found:
            key = (tp.topic, tp.partition)
            # Nothing committed: auto.offset.reset=earliest starts at the log start.
            self._committed[key] = tp.offset if tp.offset >= 0 else max(watermarks[key][0], 0)
        return {key: self._committed[key] for key in partitions if key in self._committed}


# About how long a live record spends between validate's output and persist's commit (two
# transactional hops, measured 70-100 ms at 1,000 req/s): its share of the downstream backlog.
_LIVE_TRIP_S = 0.1


class PriorityGate:
    """Decides which ``bulk_topics`` partitions to pause: all of them while the
    ``live_topics`` partitions lag, or while the downstream backlog is at the limit.

    A pure decision (no Kafka client, no clock): the runner hands it the assignment, the
    live lag (:class:`LiveLagReader`), the latest downstream :class:`Reading` (None: no
    downstream rule, or no recent reading) and the time, and pauses what it answers. Its
    state is the hysteresis, the live arrival rate, and ``admitted``: the bulk records let
    in so far, which the reading thread samples (see :class:`DownstreamBacklog`).
    """

    def __init__(
        self,
        *,
        live_topics: Collection[str],
        bulk_topics: Collection[str],
        max_live_lag: int,
        max_downstream: int = 0,
        max_downstream_idle: int = 0,
        live_idle_s: float = 5.0,
        stale_after_s: float = 10.0,
    ) -> None:
        self._live = set(live_topics)
        self._bulk = set(bulk_topics)
        self._max_lag = max_live_lag
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

    def live_partitions(self, assigned: Iterable[Partition]) -> set[Partition]:
        return {tp for tp in assigned if tp[0] in self._live}

    def bulk_partitions(self, assigned: Iterable[Partition]) -> set[Partition]:
        return {tp for tp in assigned if tp[0] in self._bulk}

    def admit(self, consumed: Iterable[str]) -> None:
        """Count the bulk records among ``consumed`` (the topic of each record consumed)."""
        self.admitted += sum(1 for topic in consumed if topic in self._bulk)

    def decide(
        self,
        *,
        assigned: Collection[Partition],
        live: LiveLag,
        reading: Reading | None,
        now: float,
    ) -> set[Partition]:
        """The bulk partitions of ``assigned`` to hold paused now (empty: let them flow)."""
        bulk = self.bulk_partitions(assigned)
        if not bulk:
            return set()
        if self._live_end is not None and live.end != self._live_end:
            self._live_seen_at = now  # live requests arrived since the last look
        self._live_end = live.end
        self._measure_live_rate(now, live.end)
        self._update_live_rule(live.lag)
        in_flight = self.in_flight(reading, now)
        self._update_downstream_rule(in_flight, now)
        if self._live_blocked or self._downstream_blocked:
            return bulk
        return set()

    def _update_live_rule(self, lag: int | None) -> None:
        if lag is None or lag > self._max_lag:
            # Unknown (a live partition not fetched yet, e.g. just after start or a
            # rebalance) counts as a backlog: otherwise backfill fetched first goes first.
            if not self._live_blocked:
                log.debug("live lag %s: backfill paused", lag)
            self._live_blocked = True
        elif lag <= self._max_lag // 2 and self._live_blocked:
            log.debug("live lag %d: live rule lets backfill in", lag)
            self._live_blocked = False

    def _update_downstream_rule(self, in_flight: int | None, now: float) -> None:
        # Live traffic seen lately: keep the downstream queue short, so a live request
        # waits behind little backfill. None for a while: let the backfill run (fast), but
        # not so far ahead that the next live request waits long behind it.
        if now - self._live_seen_at < self._live_idle_s:
            # Live requests are part of the downstream backlog too: their own share (rate x
            # about one downstream trip) is added, so the limit is what backfill may add.
            limit = self._max_downstream + int(self.live_rate * _LIVE_TRIP_S)
        else:
            limit = self._max_downstream_idle
        if in_flight is not None and in_flight >= limit:
            if not self._downstream_blocked:
                log.debug("downstream %d: backfill paused", in_flight)
            self._downstream_blocked = True
        elif in_flight is None or in_flight < limit // 2:
            self._downstream_blocked = False

    def _measure_live_rate(self, now: float, end: int) -> None:
        if self._rate_mark is None or end < self._rate_mark[1]:  # first look, or reassigned
            self._rate_mark = (now, end)
            return
        since, then = self._rate_mark
        if now - since >= 1.0:
            self.live_rate = (end - then) / (now - since)
            self._rate_mark = (now, end)

    def in_flight(self, reading: Reading | None, now: float) -> int | None:
        """Records waiting downstream at ``now``, counting those let in since ``reading``
        started; None without a reading or when it is older than ``stale_after_s`` (the
        broker unreachable, say: better than blocking the backfill forever)."""
        if reading is None or now - reading.taken_at > self._stale_after_s:
            return None
        return reading.backlog + (self.admitted - reading.admitted_before)

"""The send loop shared by file backfills and replays.

A :class:`Source` yields :data:`Item` s in row order: a request to send (a
:class:`TenantRequest` to send it under a tenant's header), a :class:`Reject` to report, or
None for a row deliberately skipped. :class:`BackfillRun` sends each request to
``inference.requests.backfill`` (idempotent producer, acks=all), counts a row done when Kafka
acknowledges it, and saves the checkpoint every ``checkpoint_interval_s`` and at the end. A
request over ``max_request_bytes`` (the limit ingest applies) is not sent: it becomes a
``too_large`` reject, since the stages could not carry it to the end.

Stopping (``stop`` set by SIGINT/SIGTERM, or a delivery failure): no new row is read, every
record already handed to the producer gets its delivery report (or the delivery timeout
passes), then the checkpoint is saved. It then covers exactly the rows Kafka holds, up to the
first gap, so ``--resume`` neither skips a row nor needs to send an acknowledged one again.
"""

from __future__ import annotations

import functools
import logging
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Literal, Protocol

from confluent_kafka import KafkaError, Message, Producer

from backfill.checkpoint import (
    Checkpoint,
    CheckpointStore,
    PrefixTracker,
    RejectLine,
    RejectReport,
    SourceState,
)
from backfill.convert import Reject
from backfill.pacing import ProgressLine, Snapshot, TokenBucket
from kafkaio.produce import produce_request
from schemas import Codec, RequestV1

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class TenantRequest:
    """A request to send with ``tenant`` as its tenant header (replay keeps the original
    record's tenant); a plain :class:`RequestV1` goes without one, to the default tenant."""

    request: RequestV1
    tenant: bytes


Item = tuple[int, RequestV1 | TenantRequest | Reject | None]


class Source(Protocol):
    """Rows of one file (or partition), each turned into an :data:`Item`."""

    state: SourceState

    def items(self, *, after_row: int) -> Iterator[Item]:
        """Items for the rows after ``after_row``, in row order, built lazily (a request's
        ``created_at`` is the moment it is built, just before it is sent)."""
        ...


class DeadLetterCount(Protocol):
    """How many of this backfill's requests are in the DLQ so far."""

    def poll(self) -> int: ...


@dataclass(frozen=True, slots=True)
class RunOutcome:
    status: Literal["done", "interrupted", "failed"]
    error: str | None
    sent_this_run: int
    seconds: float


class BackfillRun:
    """Sends the sources' items; see the module docstring for the guarantees."""

    def __init__(
        self,
        *,
        producer: Producer,
        topic: str,
        store: CheckpointStore,
        checkpoint: Checkpoint,
        rejects: RejectReport,
        stop: threading.Event,
        progress: ProgressLine,
        pacer: TokenBucket | None = None,
        dead_letters: DeadLetterCount | None = None,
        max_request_bytes: int | None = None,
        checkpoint_interval_s: float = 1.0,
        drain_timeout_s: float = 60.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._producer = producer
        self._topic = topic
        self._store = store
        self.checkpoint = checkpoint
        self._rejects = rejects
        self._stop = stop
        self._progress = progress
        self._pacer = pacer
        self._dead_letters = dead_letters
        self._max_request_bytes = max_request_bytes
        self._interval_s = checkpoint_interval_s
        self._drain_timeout_s = drain_timeout_s
        self._clock = clock
        self._codec = Codec(RequestV1)
        self._trackers: list[PrefixTracker] = []
        self._failure: str | None = None
        self._saved_at = clock()
        self._sent = 0
        self._current = ""
        self.dead_lettered = 0

    def run(self, sources: Sequence[Source]) -> RunOutcome:
        """Send every source not yet complete; see the module docstring."""
        started = self._clock()
        for index, source in enumerate(sources, start=1):
            if source.state.complete:
                continue
            self._current = f"[{index}/{len(sources)}] {source.state.name}"
            try:
                if not self._send_source(source):
                    break
            except Exception as exc:  # e.g. a corrupt file: still save what Kafka holds
                log.exception("%s: reading failed", source.state.name)
                self._failure = f"{source.state.name}: {type(exc).__name__}: {exc}"
                break
        self._drain()
        self._save()
        self._progress.update(self._snapshot(), force=True)
        self._progress.finish()
        status: Literal["done", "interrupted", "failed"] = (
            "failed" if self._failure else "interrupted" if self._stop.is_set() else "done"
        )
        if status == "done" and not self.checkpoint.complete:
            status, self._failure = "failed", "some rows were not acknowledged by Kafka"
        return RunOutcome(status, self._failure, self._sent, self._clock() - started)

    def _send_source(self, source: Source) -> bool:
        """Send one source's items; False when stopping early."""
        tracker = PrefixTracker(source.state)
        self._trackers.append(tracker)
        for count, (row, payload) in enumerate(source.items(after_row=source.state.resume_after())):
            if self._stop.is_set() or self._failure:
                return False
            if isinstance(payload, RequestV1 | TenantRequest):
                payload = self._send(tracker, row, payload)  # sent: None; too large: a Reject
            elif payload is None:
                tracker.add(row, "skipped", done=True)
            if isinstance(payload, Reject):
                tracker.add(row, "rejected", done=True)
                self._rejects.add(
                    RejectLine(
                        source=source.state.name,
                        row=row,
                        reason=payload.reason,
                        detail=payload.detail,
                    )
                )
            if count % 256 == 0:
                self._tick()
        tracker.read_to_end = True
        return not (self._stop.is_set() or self._failure)

    def _send(
        self, tracker: PrefixTracker, row: int, payload: RequestV1 | TenantRequest
    ) -> Reject | None:
        """Produce the request; a ``too_large`` :class:`Reject` instead when its record (value
        and key) exceeds ``max_request_bytes``."""
        request, tenant = (
            (payload.request, payload.tenant)
            if isinstance(payload, TenantRequest)
            else (payload, None)
        )
        value, key = self._codec.encode(request), request.id.encode()
        size = len(value) + len(key)
        if self._max_request_bytes is not None and size > self._max_request_bytes:
            limit = self._max_request_bytes
            detail = f"the request takes {size} bytes as a record; the pipeline carries {limit}"
            return Reject(row, "too_large", detail)
        if self._pacer is not None:
            self._wait(self._pacer.take())
        tracker.add(row, "sent")
        produce_request(
            self._producer,
            self._topic,
            value=value,
            key=key,
            on_delivery=functools.partial(self._delivered, tracker, row),
            tenant=tenant,
        )
        self._sent += 1
        if self._sent % 64 == 0:
            self._producer.poll(0)
        return None

    def _delivered(
        self, tracker: PrefixTracker, row: int, err: KafkaError | None, _msg: Message
    ) -> None:
        if err is None:
            tracker.complete(row)
        elif self._failure is None:
            self._failure = f"{tracker.state.name} row {row}: Kafka did not take it: {err}"

    def _wait(self, seconds: float) -> None:
        """Let ``seconds`` pass serving delivery reports and progress; returns early on stop."""
        deadline = self._clock() + seconds
        while not self._stop.is_set() and (left := deadline - self._clock()) > 0:
            self._producer.poll(min(left, 0.1))
            self._tick()

    def _drain(self) -> None:
        deadline = self._clock() + self._drain_timeout_s
        while len(self._producer) and self._clock() < deadline:
            self._producer.poll(0.1)
            self._tick()

    def _tick(self) -> None:
        self._producer.poll(0)
        now = self._clock()
        if now - self._saved_at >= self._interval_s:
            self._save()
        self._progress.update(self._snapshot())

    def _save(self) -> None:
        for tracker in self._trackers:
            if tracker.read_to_end and tracker.in_flight == 0:
                tracker.state.complete = True
        self._rejects.sync()  # before the checkpoint that counts these lines
        self.checkpoint.updated_at = time.time()
        self._store.save(self.checkpoint)
        self._saved_at = self._clock()
        if self._dead_letters is not None:
            self.dead_lettered = self._dead_letters.poll()

    def _snapshot(self) -> Snapshot:
        sources = self.checkpoint.sources
        estimates = [s.estimated_rows for s in sources]
        total = None if None in estimates else sum(e or 0 for e in estimates)
        return Snapshot(
            done=sum(s.rows_done for s in sources),
            total=total,
            rejected=self.checkpoint.rejected,
            dead_lettered=self.dead_lettered,
            source=self._current,
        )

"""The backfill send loop's bookkeeping: what the checkpoint claims versus what Kafka
acknowledged, when acknowledgements arrive out of order, on Ctrl-C and on a failed delivery.

The producer here only replays librdkafka's delivery-report contract (a callback per record,
served from ``poll``, in any order); the real thing is covered by the integration tests.
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from confluent_kafka import KafkaError

from backfill.checkpoint import (
    Checkpoint,
    CheckpointStore,
    SourceState,
    read_rejects,
)
from backfill.convert import Reject
from backfill.engine import Item
from schemas import RequestV1
from tests.unit.backfill.engine_run import run_engine


class ScramblingProducer:
    """Acknowledges a random part of what is pending on each ``poll``, in random order."""

    def __init__(self, *, seed: int = 1, fail: frozenset[bytes] = frozenset()) -> None:
        self.pending: list[tuple[bytes, Callable[[KafkaError | None, Any], None]]] = []
        self.acked: set[bytes] = set()
        self.produced: list[bytes] = []
        self.on_produce: Callable[[int], None] = lambda _count: None
        self._random = random.Random(seed)
        self._fail = fail

    def produce(self, _topic: str, *, key: bytes, on_delivery: Any, **_kw: Any) -> None:
        self.pending.append((key, on_delivery))
        self.produced.append(key)
        self.on_produce(len(self.produced))

    def poll(self, _timeout: float = 0) -> int:
        self._random.shuffle(self.pending)
        cut = self._random.randint(0, len(self.pending))
        served, self.pending = self.pending[:cut], self.pending[cut:]
        for key, callback in served:
            if key in self._fail:
                callback(KafkaError(KafkaError._MSG_TIMED_OUT), None)
            else:
                self.acked.add(key)
                callback(None, None)
        return len(served)

    def __len__(self) -> int:
        return len(self.pending)


class RecordingStore(CheckpointStore):
    """Checks, at every save, that the claimed prefix was acknowledged (or rejected)."""

    def __init__(self, directory: Path, producer: ScramblingProducer, done: set[int]) -> None:
        super().__init__(directory)
        self.producer = producer
        self.done = done  # rows rejected, or acknowledged in an earlier run
        self.saved_rows: list[int] = []

    def save(self, checkpoint: Checkpoint) -> None:
        last = checkpoint.sources[0].last_row
        for row in range(1, last + 1):
            assert row in self.done or key(row) in self.producer.acked, f"row {row} claimed"
        self.saved_rows.append(last)
        super().save(checkpoint)


def key(row: int) -> bytes:
    return f"r{row}".encode()


class RowsSource:
    """Rows 1..count; the ones in ``rejected`` cannot become requests."""

    def __init__(self, count: int, rejected: set[int], state: SourceState | None = None) -> None:
        self.count = count
        self.rejected = rejected
        self.state = state or SourceState(
            name="mem", kind="file", key="k", format="csv", fingerprint="f", estimated_rows=count
        )

    def items(self, *, after_row: int) -> Iterator[Item]:
        for row in range(after_row + 1, self.count + 1):
            if row in self.rejected:
                yield row, Reject(row, "not_a_number", "x")
            else:
                yield row, RequestV1(id=f"r{row}", model="m", inputs={}, created_at=time.time())


def run(
    tmp_path: Path,
    producer: ScramblingProducer,
    source: RowsSource,
    stop: threading.Event,
    acked_before: set[int] | None = None,
) -> tuple[Any, Checkpoint, RecordingStore]:
    store = RecordingStore(tmp_path, producer, source.rejected | (acked_before or set()))
    checkpoint = (
        store.load("bf")
        if store.exists("bf")
        else Checkpoint(
            backfill_id="bf", kind="files", model="m", created_at=0, updated_at=0, sources=[]
        )
    )
    checkpoint.sources = [source.state]
    outcome = run_engine(producer, store, checkpoint, [source], stop=stop, drain_timeout_s=5)
    return outcome, checkpoint, store


def test_out_of_order_acknowledgements_never_overclaim(tmp_path: Path) -> None:
    producer = ScramblingProducer()
    rejected = {5, 700, 701, 2000}
    outcome, checkpoint, store = run(
        tmp_path, producer, RowsSource(2000, rejected), threading.Event()
    )
    assert outcome.status == "done"
    assert len(store.saved_rows) > 5 and store.saved_rows == sorted(store.saved_rows)
    s = checkpoint.sources[0]
    assert (s.last_row, s.sent, s.rejected, s.complete) == (2000, 1996, 4, True)
    assert [r.row for r in read_rejects(store.rejects_path("bf"))] == sorted(rejected)


def test_ctrl_c_drains_then_resume_sends_each_row_once(tmp_path: Path) -> None:
    stop = threading.Event()
    first = ScramblingProducer(seed=2)
    first.on_produce = lambda count: stop.set() if count == 300 else None
    outcome, checkpoint, _ = run(tmp_path, first, RowsSource(1000, set()), stop)
    assert outcome.status == "interrupted"
    state = checkpoint.sources[0]
    assert state.last_row == 300 == len(first.acked)  # everything in flight was acknowledged
    assert not state.complete

    second = ScramblingProducer(seed=3)
    resumed = RowsSource(1000, set(), state=CheckpointStore(tmp_path).load("bf").sources[0])
    before = set(range(1, 301))
    outcome, checkpoint, _ = run(tmp_path, second, resumed, threading.Event(), before)
    assert outcome.status == "done" and checkpoint.sources[0].complete
    assert sorted(first.produced + second.produced) == sorted(key(r) for r in range(1, 1001))


def test_a_failed_delivery_stops_the_prefix_before_it(tmp_path: Path) -> None:
    producer = ScramblingProducer(seed=4, fail=frozenset({key(500)}))
    outcome, checkpoint, _ = run(tmp_path, producer, RowsSource(3000, set()), threading.Event())
    assert outcome.status == "failed"
    assert outcome.error is not None and "row 500" in outcome.error
    assert checkpoint.sources[0].last_row == 499
    assert len(producer.produced) < 3000  # stopped reading soon after the failure


class BreakingSource(RowsSource):
    """A file that turns out to be corrupt after row 250."""

    def items(self, *, after_row: int) -> Iterator[Item]:
        for item in super().items(after_row=after_row):
            if item[0] > 250:
                raise OSError("truncated file")
            yield item


def test_a_source_that_breaks_mid_way_keeps_what_kafka_acknowledged(tmp_path: Path) -> None:
    producer = ScramblingProducer(seed=5)
    outcome, checkpoint, _ = run(tmp_path, producer, BreakingSource(1000, set()), threading.Event())
    assert outcome.status == "failed"
    assert outcome.error is not None and "truncated file" in outcome.error
    assert checkpoint.sources[0].last_row == 250 and not checkpoint.sources[0].complete
    assert CheckpointStore(tmp_path).load("bf").sources[0].last_row == 250

"""The garbage collector while a stage runs: start-up heap frozen, young threshold above a
batch (stages.runtime.settled_heap)."""

from __future__ import annotations

import gc
import threading
from collections.abc import Iterator
from typing import Any

import pytest

from stages.records import BatchOutcome, Record
from stages.runtime import HeapPolicy, StageRunner, settled_heap


@pytest.fixture(autouse=True)
def _collector_restored() -> Iterator[None]:
    before = gc.get_threshold()
    yield
    gc.set_threshold(*before)
    gc.unfreeze()


def test_the_young_threshold_scales_with_the_batch_and_has_a_floor() -> None:
    policy = HeapPolicy()
    assert policy.gen0_threshold(500) == 50_000
    assert policy.gen0_threshold(5_000) == 200_000
    assert HeapPolicy(gen0_per_record=0).gen0_threshold(5_000) is None


def test_the_heap_is_settled_while_the_block_runs_and_restored_after() -> None:
    before = gc.get_threshold()
    kept = [object() for _ in range(10)], {"a": [1]}  # something alive to freeze
    with settled_heap(HeapPolicy(), batch_size=5_000):
        assert gc.get_freeze_count() > 0
        assert gc.get_threshold() == (200_000, *before[1:])
    assert gc.get_freeze_count() == 0
    assert gc.get_threshold() == before
    assert kept


def test_no_policy_leaves_the_collector_alone() -> None:
    before = gc.get_threshold()
    with settled_heap(None, batch_size=500):
        assert gc.get_threshold() == before and gc.get_freeze_count() == 0


class _OnePoll:
    """A consumer that notes the collector's state at its first poll and stops the runner."""

    def __init__(self, stop: threading.Event) -> None:
        self.stop = stop
        self.seen: tuple[tuple[int, int, int], int] | None = None

    def poll(self, timeout: float) -> None:
        self.seen = (gc.get_threshold(), gc.get_freeze_count())
        self.stop.set()

    def subscribe(self, *args: Any, **kwargs: Any) -> None: ...
    def close(self) -> None: ...


class _Idle:
    def publish(self, *args: Any, **kwargs: Any) -> None: ...
    def commit(self) -> None: ...
    def commit_due_in(self) -> float | None:
        return None

    def abort(self) -> None: ...
    def close(self) -> None: ...


class _Nothing:
    name = "nothing"

    def process(self, batch: list[Record]) -> BatchOutcome:
        return BatchOutcome.empty()


@pytest.mark.parametrize("heap", [HeapPolicy(), None])
def test_a_runner_settles_the_heap_for_as_long_as_it_runs(heap: HeapPolicy | None) -> None:
    before = gc.get_threshold()
    stop = threading.Event()
    consumer = _OnePoll(stop)
    runner = StageRunner(
        stage=_Nothing(),
        consumer=consumer,  # type: ignore[arg-type]
        committer=_Idle(),  # type: ignore[arg-type]
        input_topics=["in"],
        dlq_topic="dlq",
        batch_size=2_000,
        batch_timeout_s=0.0,
        heap=heap,
    )
    runner.run(stop)
    assert consumer.seen is not None
    threshold, frozen = consumer.seen
    if heap is None:
        assert (threshold, frozen) == (before, 0)
    else:
        assert threshold[0] == 80_000 and frozen > 0
    assert gc.get_threshold() == before and gc.get_freeze_count() == 0

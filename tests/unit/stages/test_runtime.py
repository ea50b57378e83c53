from collections.abc import Sequence

import pytest

from stages.dlq import dlq_output
from stages.errors import SinkUnavailable
from stages.records import BatchOutcome, Output, Record, Rejection, child_traceparent
from stages.runtime import first_offsets, next_offsets, process_isolating
from tests.helpers import record


class RaisesOn:
    """A stage that fails a whole batch whenever it contains a record whose value is poison."""

    name = "test"

    def __init__(self, poison: bytes, error: type[Exception] = ValueError) -> None:
        self.poison = poison
        self.error = error
        self.calls = 0

    def process(self, batch: Sequence[Record]) -> BatchOutcome:
        self.calls += 1
        if any(r.value == self.poison for r in batch):
            raise self.error("boom")
        return BatchOutcome(
            outputs=[Output(topic="out", key=r.key, value=r.value, headers=[]) for r in batch],
            rejected=[],
        )


def test_a_raising_record_is_dead_lettered_and_the_rest_flow() -> None:
    batch = [record(b"a", offset=0), record(b"poison", offset=1), record(b"c", offset=2)]
    outcome = process_isolating(RaisesOn(b"poison"), batch)
    assert [o.value for o in outcome.outputs] == [b"a", b"c"]
    [rejection] = outcome.rejected
    assert rejection.reason == "stage_error"
    assert rejection.detail == "ValueError: boom"
    assert rejection.record.offset == 1


def test_a_healthy_batch_is_processed_once() -> None:
    stage = RaisesOn(b"poison")
    outcome = process_isolating(stage, [record(b"a"), record(b"b", offset=1)])
    assert stage.calls == 1
    assert len(outcome.outputs) == 2


def test_sink_unavailable_is_never_dead_lettered() -> None:
    stage = RaisesOn(b"a", error=SinkUnavailable)
    with pytest.raises(SinkUnavailable):
        process_isolating(stage, [record(b"a"), record(b"b", offset=1)])


def test_offsets_to_commit_and_to_rewind_are_per_partition() -> None:
    batch = [
        record(b"", topic="t", partition=0, offset=5),
        record(b"", topic="t", partition=1, offset=9),
        record(b"", topic="t", partition=0, offset=7),
        record(b"", topic="u", partition=0, offset=1),
    ]
    commit = {(tp.topic, tp.partition): tp.offset for tp in next_offsets(batch)}
    rewind = {(tp.topic, tp.partition): tp.offset for tp in first_offsets(batch)}
    assert commit == {("t", 0): 8, ("t", 1): 10, ("u", 0): 2}
    assert rewind == {("t", 0): 5, ("t", 1): 9, ("u", 0): 1}


def test_dlq_record_keeps_the_original_bytes_and_says_why() -> None:
    original = Record(
        topic="in",
        partition=3,
        offset=42,
        key=b"key",
        value=b"\x00raw",
        headers=(("traceparent", b"00-abc"),),
    )
    out = dlq_output(
        Rejection(original, "malformed", "bad bytes"), stage="validate", dlq_topic="dlq"
    )
    assert (out.topic, out.key, out.value) == ("dlq", b"key", b"\x00raw")
    headers = dict(out.headers)
    assert headers == {
        "traceparent": b"00-abc",
        "dlq.stage": b"validate",
        "dlq.reason": b"malformed",
        "dlq.error": b"bad bytes",
        "dlq.source.topic": b"in",
        "dlq.source.partition": b"3",
        "dlq.source.offset": b"42",
    }


def test_traceparent_keeps_the_trace_and_changes_the_span() -> None:
    parent = b"00-" + b"a" * 32 + b"-" + b"b" * 16 + b"-01"
    child = child_traceparent(parent).split(b"-")
    assert child[1] == b"a" * 32
    assert child[2] != b"b" * 16 and len(child[2]) == 16
    assert len(child_traceparent(b"garbage").split(b"-")[1]) == 32

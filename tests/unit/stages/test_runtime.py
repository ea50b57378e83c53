from collections.abc import Sequence

import pytest

from stages.consumed import first_offsets, next_offsets, read_messages
from stages.dlq import dlq_output
from stages.errors import SinkUnavailable
from stages.isolation import process_isolating, process_within_limit
from stages.records import BatchOutcome, Output, Record, Rejection, wire_size
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


def test_a_dead_letter_over_the_limit_keeps_its_headers_and_cuts_the_value() -> None:
    original = Record(
        topic="in",
        partition=1,
        offset=7,
        key=b"k",
        value=b"v" * 5000,
        headers=(("traceparent", b"00-abc"),),
    )
    out = dlq_output(
        Rejection(original, "too_large", "big"), stage="validate", dlq_topic="dlq", max_bytes=2000
    )
    headers = dict(out.headers)
    assert wire_size(out) <= 2000
    assert headers["traceparent"] == b"00-abc"
    assert headers["dlq.truncated"] == b"5000"
    assert headers["dlq.source.offset"] == b"7"
    assert out.value == original.value[: len(out.value)] and len(out.value) > 1000


def test_a_dead_letter_whose_headers_are_too_large_keeps_its_coordinates() -> None:
    original = Record(
        topic="in", partition=1, offset=7, key=b"k", value=b"v", headers=(("huge", b"h" * 5000),)
    )
    out = dlq_output(
        Rejection(original, "malformed", "x"), stage="validate", dlq_topic="dlq", max_bytes=2000
    )
    headers = dict(out.headers)
    assert wire_size(out) <= 2000
    assert "huge" not in headers
    assert headers["dlq.reason"] == b"malformed"
    assert (headers["dlq.source.topic"], headers["dlq.source.offset"]) == (b"in", b"7")


def test_a_dead_letter_under_the_limit_is_untouched() -> None:
    original = record(b"v" * 100)
    out = dlq_output(
        Rejection(original, "malformed", "x"), stage="s", dlq_topic="d", max_bytes=2000
    )
    assert out.value == original.value
    assert "dlq.truncated" not in dict(out.headers)


class Big:
    """Outputs ``size`` bytes for a record whose value is ``big``, else the value."""

    name = "big"

    def __init__(self, size: int) -> None:
        self.size = size

    def process(self, batch: Sequence[Record]) -> BatchOutcome:
        return BatchOutcome(
            outputs=[
                Output("out", r.key, b"x" * self.size if r.value == b"big" else r.value, [])
                for r in batch
            ],
            rejected=[],
        )


def test_only_the_record_with_an_oversized_output_is_dead_lettered() -> None:
    batch = [record(b"a"), record(b"big", offset=1), record(b"c", offset=2)]
    outcome = process_within_limit(Big(3000), batch, 2000)
    assert [o.value for o in outcome.outputs] == [b"a", b"c"]
    [rejection] = outcome.rejected
    assert (rejection.reason, rejection.record.offset) == ("too_large", 1)
    assert "exceeds the limit of 2000 bytes" in rejection.detail


def test_outputs_within_the_limit_pass_as_they_are() -> None:
    outcome = process_within_limit(Big(1000), [record(b"big")], 2000)
    assert len(outcome.outputs) == 1 and outcome.rejected == []


class Unreadable:
    """A message whose headers confluent-kafka cannot decode (a name that is not UTF-8)."""

    def topic(self) -> str:
        return "in"

    def partition(self) -> int:
        return 2

    def offset(self) -> int:
        return 9

    def key(self) -> bytes:
        return b"k"

    def value(self) -> bytes:
        return b"raw"

    def headers(self) -> list[tuple[str, bytes]]:
        b"\xff".decode()  # raises UnicodeDecodeError, as confluent-kafka does
        return []

    def timestamp(self) -> tuple[int, int]:
        return (1, 0)


def test_an_unreadable_message_becomes_a_malformed_rejection() -> None:
    records, unreadable = read_messages([Unreadable()])  # type: ignore[list-item]
    assert records == []
    [rejection] = unreadable
    assert rejection.reason == "malformed"
    assert "UnicodeDecodeError" in rejection.detail
    assert (rejection.record.partition, rejection.record.offset) == (2, 9)
    assert (rejection.record.key, rejection.record.value) == (b"k", b"raw")

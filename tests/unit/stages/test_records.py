"""Records, outputs and their headers: what every stage builds per record."""

from __future__ import annotations

import gc

import msgspec
import pytest
from confluent_kafka import Message

from schemas import Headers
from stages.consumed import read_messages, to_record
from stages.records import Output, Record, Rejection, output_headers, wire_size

PARENT = b"00-" + b"a" * 32 + b"-" + b"b" * 16 + b"-01"


def _record(*headers: tuple[str, bytes]) -> Record:
    return Record(topic="t", partition=0, offset=1, key=b"k", value=b"v", headers=headers)


def test_an_output_carries_its_sources_trace_and_tenant() -> None:
    source = _record((Headers.TRACEPARENT, PARENT), (Headers.TENANT, b"acme"))
    headers = output_headers(source, "inference.result/1")
    assert headers == [
        (Headers.CONTENT_TYPE, Headers.MSGPACK),
        (Headers.SCHEMA, b"inference.result/1"),
        (Headers.TRACEPARENT, PARENT),  # no span of its own unless a tracer records one
        (Headers.TENANT, b"acme"),
    ]


def test_the_first_of_repeated_headers_counts_as_record_header_finds_it() -> None:
    other = PARENT.replace(b"a", b"c")
    source = _record(
        (Headers.TENANT, b"first"),
        (Headers.TRACEPARENT, PARENT),
        (Headers.TENANT, b"second"),
        (Headers.TRACEPARENT, other),
    )
    headers = dict(output_headers(source, "s/1"))
    assert headers[Headers.TENANT] == source.header(Headers.TENANT) == b"first"
    assert headers[Headers.TRACEPARENT] == source.header(Headers.TRACEPARENT) == PARENT


@pytest.mark.parametrize("parent", [None, b"garbage", b"\xff" * 55])
def test_an_output_of_a_record_without_a_usable_trace_starts_one(parent: bytes | None) -> None:
    source = _record() if parent is None else _record((Headers.TRACEPARENT, parent))
    headers = dict(output_headers(source, "s/1"))
    value = headers[Headers.TRACEPARENT]
    assert isinstance(value, bytes) and value != parent and len(value) == 55
    assert Headers.TENANT not in headers
    assert dict(output_headers(None, "s/1"))[Headers.TRACEPARENT] != value  # fresh each time


def test_outputs_do_not_share_their_header_lists() -> None:
    source = _record((Headers.TRACEPARENT, PARENT))
    first, second = output_headers(source, "s/1"), output_headers(source, "s/1")
    first[2] = (Headers.TRACEPARENT, b"rewritten by a tracer")
    assert second[2] == (Headers.TRACEPARENT, PARENT)


def test_records_outputs_and_rejections_are_frozen_untracked_structs() -> None:
    record = _record((Headers.TENANT, b"acme"))
    output = Output("out", None, b"v", [("h", b"1")])
    rejection = Rejection(record, "malformed", "why")
    for made in (record, output, rejection):
        assert not gc.is_tracked(made)  # a batch of them never starts a collection
        with pytest.raises(AttributeError):
            made.topic = "other"  # type: ignore[misc,union-attr]
    assert rejection.stage is None and record == _record((Headers.TENANT, b"acme"))
    assert msgspec.structs.replace(output, value=b"w").value == b"w"


def test_a_consumed_messages_headers_are_kept_and_a_missing_value_becomes_empty() -> None:
    plain = Message(
        topic="t",
        partition=2,
        offset=5,
        key=b"k",
        value=b"v",
        headers=[("a", b"1"), ("b", b"2")],
        timestamp=(1, 1234),
    )
    record = to_record(plain)
    assert record == Record("t", 2, 5, b"k", b"v", (("a", b"1"), ("b", b"2")), 1234)
    holed = Message(
        topic="t", partition=0, offset=0, value=b"v", headers=[("a", None), ("b", b"2")]
    )
    assert to_record(holed).headers == (("a", b""), ("b", b"2"))
    bare = Message(topic="t", partition=0, offset=0, value=None, headers=None)
    records, unreadable = read_messages([bare])
    assert unreadable == [] and records[0].headers == () and records[0].value == b""


def test_the_wire_size_counts_every_header_byte_of_any_kind() -> None:
    output = Output("t", b"key", b"value", [("ascii", b"12"), ("é", "ü"), ("none", None)])
    expected = 128 + 3 + 5 + (10 + 5 + 2) + (10 + 2 + 2) + (10 + 4 + 0)
    assert wire_size(output) == expected

import re

from schemas.traceparent import (
    child_traceparent,
    is_traceparent,
    new_traceparent,
    propagated_traceparent,
)

W3C = re.compile(rb"^00-[0-9a-f]{32}-[0-9a-f]{16}-01$")


def test_a_new_traceparent_is_w3c_and_fresh_each_time() -> None:
    values = {new_traceparent() for _ in range(1000)}
    assert len(values) == 1000
    assert all(W3C.match(v) for v in values)


def test_a_child_keeps_the_trace_and_changes_the_span() -> None:
    parent = b"00-" + b"a" * 32 + b"-" + b"b" * 16 + b"-01"
    child = child_traceparent(parent)
    assert W3C.match(child)
    parts = child.split(b"-")
    assert parts[1] == b"a" * 32
    assert parts[2] != b"b" * 16


def test_a_malformed_parent_starts_a_new_trace() -> None:
    for parent in (b"garbage", b"", b"00-short-span-01", None):
        child = child_traceparent(parent)
        assert W3C.match(child), child


def test_a_well_formed_parent_is_propagated_as_it_is() -> None:
    parent = b"00-" + b"a" * 32 + b"-" + b"b" * 16 + b"-01"
    assert propagated_traceparent(parent) is parent
    odd = b"0-" + b"a" * 32 + b"-" + b"b" * 16 + b"-001"  # 55 bytes, dashes elsewhere
    assert is_traceparent(odd) and propagated_traceparent(odd) is odd


def test_a_missing_or_malformed_parent_is_replaced_by_a_new_trace() -> None:
    malformed = (b"garbage", b"", b"00-short-span-01", b"\xff" * 55, b"-" * 55, None)
    for parent in (*malformed, b"00-" + b"a" * 32 + b"-" + b"b" * 16 + b"-0-"):
        assert not is_traceparent(parent)
        assert W3C.match(propagated_traceparent(parent)), parent

import re

from schemas.traceparent import child_traceparent, new_traceparent

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

"""The Redis key layout (schemas/keys.py) and the result store's writes, against a fake."""

from __future__ import annotations

from typing import Any, cast

import pytest
import redis

from schemas.keys import ResultKeys, ready_ids, ready_message, reserved_attributes, tenant_of
from sinks.redis_store import ResultStore
from tests.unit.sinks.fakes import FakeRedis


def test_keys_are_per_tenant_and_carry_the_prefix() -> None:
    keys = ResultKeys(prefix="t1.")
    assert keys.key("acme", "r/1:x") == "t1.result:acme:r/1:x"
    assert keys.channel("acme") == "t1.results-ready:acme"
    assert keys.channel("a:b") == "t1.results-ready:a%3Ab" != keys.channel("a")
    assert keys.key("globex", "r/1:x") != keys.key("acme", "r/1:x")
    assert ResultKeys().key("default", "r1") == "result:default:r1"


def test_a_tenant_header_never_splits_a_key() -> None:
    keys = ResultKeys()
    # Without escaping, tenant "a:b" with id "c" and tenant "a" with id "b:c" would share a key.
    assert keys.key("a:b", "c") == "result:a%3Ab:c"
    assert keys.key("a:b", "c") != keys.key("a", "b:c")
    assert keys.key("caf\N{LATIN SMALL LETTER E WITH ACUTE}", "c") == "result:caf%C3%A9:c"


def test_records_without_a_tenant_header_are_the_default_tenants() -> None:
    assert tenant_of(None, "trusted") == "trusted"
    assert tenant_of(b"", "trusted") == "trusted"
    assert tenant_of(b"acme", "trusted") == "acme"
    assert tenant_of(b"\xff", "trusted") == "\N{REPLACEMENT CHARACTER}"


def test_reserved_attribute_names() -> None:
    attributes = {"customer": "1", "row": "2", "source": "x", "streaminfer.tenant": "t"}
    assert reserved_attributes(attributes) == ["row", "source", "streaminfer.tenant"]
    assert reserved_attributes({"rows": "1", "my.streaminfer.x": "2"}) == []


def store_on(client: FakeRedis) -> ResultStore:
    return ResultStore(client=cast(Any, client), ttl_s=60, keys=ResultKeys(prefix="p."))


def test_flush_sets_each_result_then_announces_each_tenants_ids_once() -> None:
    client = FakeRedis()
    store = store_on(client)
    store.add("acme", "r1", b"A")
    store.add("globex", "r1", b"B")
    store.add("acme", "r/2", b"C")
    assert store.flush() == 3
    assert client.commands == [
        ("set", "p.result:acme:r1", b"A", ("ex", 60)),
        ("set", "p.result:acme:r/2", b"C", ("ex", 60)),
        ("set", "p.result:globex:r1", b"B", ("ex", 60)),
        ("publish", "p.results-ready:acme", ready_message(["r1", "r/2"])),
        ("publish", "p.results-ready:globex", ready_message(["r1"])),
    ]
    assert store.get("acme", "r1") == b"A"
    assert store.get_many("globex", ["r1", "r2"]) == [b"B", None]
    assert store.flush() == 0 and len(client.commands) == 5  # nothing pending: no command
    assert all(not c.disconnected for c in client.released)


def test_notifications_carry_any_id_and_refuse_anything_else() -> None:
    ids = ["r1", "with\nnewline", "caf\N{LATIN SMALL LETTER E WITH ACUTE}:x", "r1"]
    assert ready_ids(ready_message(ids)) == ids
    for garbage in (b"", b"\xc1", ready_message([]) + b"x", b"\x92\x01\x02"):
        with pytest.raises(ValueError, match="not a result notification"):
            ready_ids(garbage)


def test_the_packed_commands_are_byte_for_byte_what_redis_py_sends() -> None:
    client = FakeRedis()
    store = store_on(client)
    # RESP framing inside a value or an id is just bytes; an empty value is a value.
    writes = [
        ("acme", "r1", b"\r\n*3\r\n"),
        ("acme", "caf\N{LATIN SMALL LETTER E WITH ACUTE}", b""),
    ]
    for tenant, request_id, value in writes:
        store.add(tenant, request_id, value)
    store.flush()
    redis_py = redis.Connection()
    expected = [
        redis_py.pack_command("SET", f"p.result:{t}:{i}", v, "EX", 60) for t, i, v in writes
    ]
    expected.append(
        redis_py.pack_command(
            "PUBLISH", "p.results-ready:acme", ready_message([i for _, i, _ in writes])
        )
    )
    [sent] = client.released[-1].sent
    assert sent == b"".join(b"".join(parts) for parts in expected)


def test_a_failed_flush_keeps_the_batch_for_the_retry() -> None:
    client = FakeRedis()
    store = store_on(client)
    store.add("acme", "r1", b"A")
    client.failure = redis.ConnectionError("down")
    with pytest.raises(redis.ConnectionError):
        store.flush()
    assert client.released[-1].disconnected  # a broken connection is not reused
    client.failure = None
    assert store.flush() == 1
    assert client.values == {"p.result:acme:r1": b"A"}


def test_an_error_reply_is_raised_after_every_reply_was_read() -> None:
    client = FakeRedis()
    store = store_on(client)
    store.add("acme", "r1", b"A")
    store.add("acme", "r2", b"B")
    client.failure = redis.exceptions.OutOfMemoryError("OOM command not allowed")
    with pytest.raises(redis.exceptions.OutOfMemoryError):
        store.flush()
    # Both SETs and the PUBLISH were answered and read: the connection is still in step.
    connection = client.released[-1]
    assert not connection.disconnected and connection._replies == []
    store.discard()
    assert store.flush() == 0

"""The Redis key layout (schemas/keys.py) and the result store's writes, against a fake."""

from __future__ import annotations

from typing import Any, cast

import pytest
import redis

from schemas.keys import ResultKeys, reserved_attributes, tenant_of
from sinks.redis_store import ResultStore
from tests.unit.sinks.fakes import FakeRedis


def test_keys_are_per_tenant_and_carry_the_prefix() -> None:
    keys = ResultKeys(prefix="t1.")
    assert keys.key("acme", "r/1:x") == "t1.result:acme:r/1:x"
    assert keys.channel("acme", "r/1:x") == "t1.result-ready:acme:r/1:x"
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


def test_flush_sets_and_publishes_each_result_under_its_tenant() -> None:
    client = FakeRedis()
    store = store_on(client)
    store.add("acme", "r1", b"A")
    store.add("globex", "r1", b"B")
    assert store.flush() == 2
    assert client.commands == [
        ("set", "p.result:acme:r1", b"A", ("ex", 60)),
        ("publish", "p.result-ready:acme:r1", b"A"),
        ("set", "p.result:globex:r1", b"B", ("ex", 60)),
        ("publish", "p.result-ready:globex:r1", b"B"),
    ]
    assert store.get("acme", "r1") == b"A"
    assert store.get_many("globex", ["r1", "r2"]) == [b"B", None]
    assert store.flush() == 0


def test_a_failed_flush_keeps_the_batch_for_the_retry() -> None:
    client = FakeRedis()
    store = store_on(client)
    store.add("acme", "r1", b"A")
    client.failure = redis.ConnectionError("down")
    with pytest.raises(redis.ConnectionError):
        store.flush()
    client.failure = None
    assert store.flush() == 1
    assert client.values == {"p.result:acme:r1": b"A"}

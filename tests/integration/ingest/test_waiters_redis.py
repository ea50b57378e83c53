"""Persist's writes and notifications (sinks/redis_store.py) and predict's waiters
(ingest/waiters.py) against the real Redis: the packed commands are accepted, a batch's
notification settles each tenant's waiters with their own values, and a waiter whose
pub/sub connection was killed still gets its result once redis-py renewed the subscription."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
import redis
import redis.asyncio as aioredis

from ingest.waiters import ResultWaiters, Stored
from schemas.keys import ResultKeys
from sinks.redis_store import ResultStore
from streaminfer.settings import Settings

pytestmark = pytest.mark.integration


@pytest.fixture()
def url(services: None) -> str:
    return Settings().redis.url.get_secret_value()


def run_waiters(
    url: str, keys: ResultKeys, name: str, test: Callable[[ResultWaiters], Awaitable[None]]
) -> None:
    async def main() -> None:
        client = aioredis.Redis.from_url(url, client_name=name)
        waiters = ResultWaiters(client=client, keys=keys, confirm_timeout_s=5)
        reader = asyncio.create_task(waiters.run())
        try:
            await asyncio.wait_for(test(waiters), 30)
        finally:
            reader.cancel()
            await client.aclose()

    asyncio.run(main())


def test_a_batch_settles_each_tenants_waiters_with_their_own_values(url: str) -> None:
    keys = ResultKeys(prefix=f"t{uuid.uuid4().hex[:10]}.")
    store = ResultStore(client=redis.Redis.from_url(url), ttl_s=60, keys=keys)

    async def test(waiters: ResultWaiters) -> None:
        async with (
            waiters.waiting("acme", "r1") as acme,
            waiters.waiting("globex", "r1") as globex,
            waiters.waiting("acme", "r2") as late,
        ):
            store.add("globex", "r1", b"globex's")
            store.add("acme", "r1", b"acme's")
            store.add("acme", "r3", b"\r\n$-1\r\n")  # RESP inside a value is just bytes
            assert await asyncio.to_thread(store.flush) == 3
            assert await asyncio.wait_for(acme, 10) == Stored(b"acme's")
            assert await asyncio.wait_for(globex, 10) == Stored(b"globex's")
            assert not late.done()
            store.add("acme", "r2", b"two")
            await asyncio.to_thread(store.flush)
            assert await asyncio.wait_for(late, 10) == Stored(b"two")

    run_waiters(url, keys, f"waiters-{uuid.uuid4().hex[:8]}", test)
    assert store.get("acme", "r3") == b"\r\n$-1\r\n"
    assert store.get_many("acme", ["r1", "r2", "nope"]) == [b"acme's", b"two", None]


def test_a_result_stored_while_the_subscription_was_lost_still_settles(url: str) -> None:
    keys = ResultKeys(prefix=f"t{uuid.uuid4().hex[:10]}.")
    admin = redis.Redis.from_url(url)
    name = f"waiters-{uuid.uuid4().hex[:8]}"

    async def test(waiters: ResultWaiters) -> None:
        async with waiters.waiting("acme", "r1") as r1:
            killed = _kill_pubsub(admin, name)
            assert killed == 1
            # Written without a notification: only the lookup after the renewal finds it.
            admin.set(keys.key("acme", "r1"), b"one", ex=60)
            assert await asyncio.wait_for(r1, 20) == Stored(b"one")

    run_waiters(url, keys, name, test)


def _kill_pubsub(admin: redis.Redis, name: str) -> int:
    """Kill this test's pub/sub connection (by its client name; nobody else's)."""
    ids = [c["id"] for c in admin.client_list(_type="pubsub") if c.get("name") == name]
    killed: Any = sum(admin.client_kill_filter(_id=i) for i in ids)
    return int(killed)

"""Predict's waiters (ingest/waiters.py) against a fake Redis: one subscription per tenant,
a notification per batch naming ids, tenants kept apart, and renewal after a lost connection."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any, cast

import pytest
from redis.exceptions import ConnectionError as RedisConnectionError

from ingest.waiters import DeadLettered, ResultsUnavailable, ResultWaiters, Stored
from schemas.keys import ResultKeys, ready_message

KEYS = ResultKeys(prefix="p.")


class FakePubSub:
    """The pub/sub calls the waiters make: subscriptions confirmed (unless ``silent``) and
    messages queued for ``get_message``; ``drop()`` makes the next read fail once."""

    def __init__(self) -> None:
        self.connection: object | None = object()
        self.subscribed: list[bytes] = []
        self.silent = False
        self._messages: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self._fail_next = False

    async def subscribe(self, *channels: bytes) -> None:
        for channel in channels:
            self.subscribed.append(channel)
            if not self.silent:
                self.confirm(channel)

    def confirm(self, channel: bytes) -> None:
        self._messages.put_nowait({"type": "subscribe", "channel": channel, "data": 1})

    def deliver(self, channel: str, data: bytes) -> None:
        if channel.encode() in self.subscribed:
            self._messages.put_nowait(
                {"type": "message", "channel": channel.encode(), "data": data}
            )

    def drop(self) -> None:
        self._fail_next = True
        self._messages.put_nowait({"type": "wake"})

    async def ping(self) -> None:
        return None

    async def get_message(self, timeout: float) -> dict[str, Any] | None:
        try:
            message = await asyncio.wait_for(self._messages.get(), timeout)
        except TimeoutError:
            return None
        if self._fail_next:
            self._fail_next = False
            raise RedisConnectionError("connection lost")
        return message


class FakeAsyncRedis:
    def __init__(self) -> None:
        self.values: dict[str, bytes] = {}
        self.mgets: list[list[str]] = []
        self.pubsub_ = FakePubSub()

    def pubsub(self) -> FakePubSub:
        return self.pubsub_

    async def mget(self, keys: list[str]) -> list[bytes | None]:
        self.mgets.append(keys)
        return [self.values.get(k) for k in keys]

    def store(self, tenant: str, ids_values: dict[str, bytes], *, announce: bool = True) -> None:
        """What persist does for one tenant's part of a batch."""
        for request_id, value in ids_values.items():
            self.values[KEYS.key(tenant, request_id)] = value
        if announce:
            self.pubsub_.deliver(KEYS.channel(tenant), ready_message(list(ids_values)))


def run_with_waiters(
    test: Callable[[ResultWaiters, FakeAsyncRedis], Awaitable[None]], *, timeout_s: float = 0.2
) -> FakeAsyncRedis:
    redis = FakeAsyncRedis()

    async def main() -> None:
        waiters = ResultWaiters(client=cast(Any, redis), keys=KEYS, confirm_timeout_s=timeout_s)
        reader = asyncio.create_task(waiters.run())
        try:
            await asyncio.wait_for(test(waiters, redis), 10)
        finally:
            reader.cancel()

    asyncio.run(main())
    return redis


async def settles(future: asyncio.Future[Any], timeout_s: float = 5.0) -> Any:
    return await asyncio.wait_for(asyncio.shield(future), timeout_s)


async def stays_pending(future: asyncio.Future[Any]) -> bool:
    await asyncio.sleep(0.05)  # several loop turns: the reader had every chance to settle it
    return not future.done()


def test_a_notification_settles_the_waiters_of_its_ids_with_the_stored_values() -> None:
    async def test(waiters: ResultWaiters, redis: FakeAsyncRedis) -> None:
        async with waiters.waiting("acme", "r1") as r1, waiters.waiting("acme", "r2") as r2:
            assert waiters.is_waiting("r1") and not waiters.is_waiting("r3")
            redis.store("acme", {"r1": b"one", "r3": b"three"})
            assert await settles(r1) == Stored(b"one")
            assert await stays_pending(r2)
            redis.store("acme", {"r2": b"two"})
            assert await settles(r2) == Stored(b"two")
        assert not waiters.is_waiting("r1")

    redis = run_with_waiters(test)
    # One subscription for the tenant, whatever the number of waiters; one MGET per
    # notification, of the ids waited for only.
    assert redis.pubsub_.subscribed == [b"p.results-ready:acme"]
    assert redis.mgets == [["p.result:acme:r1"], ["p.result:acme:r2"]]


def test_another_tenants_results_and_dead_letters_never_settle_a_waiter() -> None:
    async def test(waiters: ResultWaiters, redis: FakeAsyncRedis) -> None:
        async with waiters.waiting("acme", "r1") as acme, waiters.waiting("globex", "r2") as gx:
            redis.store("globex", {"r1": b"globex's", "r2": b"two"})
            assert await settles(gx) == Stored(b"two")  # the same notification as globex's r1
            waiters.settle("globex", "r1", DeadLettered("expired", "late", "validate"))
            assert await stays_pending(acme)
            redis.store("acme", {"r1": b"acme's"})
            assert await settles(acme) == Stored(b"acme's")

    redis = run_with_waiters(test)
    assert ["p.result:globex:r1"] not in redis.mgets


def test_a_notification_nobody_here_waits_for_costs_no_redis_command() -> None:
    async def test(waiters: ResultWaiters, redis: FakeAsyncRedis) -> None:
        async with waiters.waiting("acme", "r1") as r1:
            redis.store("acme", {"r1": b"one"})
            await settles(r1)
        redis.store("acme", {"r9": b"nine"})  # the tenant's channel stays subscribed
        redis.pubsub_.deliver(KEYS.channel("acme"), b"\xc1 not a notification")
        async with waiters.waiting("acme", "r2") as r2:
            redis.store("acme", {"r2": b"two"})  # the reader got past what came before
            await settles(r2)

    redis = run_with_waiters(test)
    assert redis.mgets == [["p.result:acme:r1"], ["p.result:acme:r2"]]


def test_waiting_needs_redis_to_confirm_the_subscription() -> None:
    async def test(waiters: ResultWaiters, redis: FakeAsyncRedis) -> None:
        redis.pubsub_.silent = True
        with pytest.raises(ResultsUnavailable):
            async with waiters.waiting("acme", "r1"):
                pass
        assert not waiters.is_waiting("r1")
        redis.pubsub_.silent = False  # the next waiter subscribes again
        async with waiters.waiting("acme", "r1") as r1:
            redis.store("acme", {"r1": b"one"})
            assert await settles(r1) == Stored(b"one")

    redis = run_with_waiters(test)
    assert redis.pubsub_.subscribed == [b"p.results-ready:acme"] * 2


def test_after_a_redis_error_the_reader_subscribes_again_and_looks_up_the_waiting_ids() -> None:
    async def test(waiters: ResultWaiters, redis: FakeAsyncRedis) -> None:
        async with waiters.waiting("acme", "r1") as r1, waiters.waiting("acme", "r2") as r2:
            redis.pubsub_.drop()  # and nothing renews the subscription by itself
            # Stored while the connection was down: its notification never arrives.
            redis.store("acme", {"r1": b"one"}, announce=False)
            assert await settles(r1) == Stored(b"one")
            assert not r2.done()

    redis = run_with_waiters(test)
    assert redis.pubsub_.subscribed == [b"p.results-ready:acme"] * 2
    assert redis.mgets == [["p.result:acme:r1", "p.result:acme:r2"]]


def test_a_renewal_by_redis_py_itself_is_followed_by_a_lookup_too() -> None:
    async def test(waiters: ResultWaiters, redis: FakeAsyncRedis) -> None:
        async with waiters.waiting("acme", "r1") as r1:
            redis.store("acme", {"r1": b"one"}, announce=False)
            redis.pubsub_.confirm(b"p.results-ready:acme")  # reconnected and resubscribed
            assert await settles(r1) == Stored(b"one")

    run_with_waiters(test)


def test_until_the_subscription_is_confirmed_again_a_new_waiter_waits_for_it() -> None:
    entered = asyncio.Event()

    async def enter_and_wait(waiters: ResultWaiters) -> Any:
        async with waiters.waiting("acme", "r2") as future:
            entered.set()
            return await settles(future)

    async def test(waiters: ResultWaiters, redis: FakeAsyncRedis) -> None:
        async with waiters.waiting("acme", "r1"):
            pass
        redis.pubsub_.silent = True  # Redis does not answer the new SUBSCRIBE yet
        redis.pubsub_.drop()
        await asyncio.sleep(0.05)  # the reader saw the error
        r2 = asyncio.create_task(enter_and_wait(waiters))
        assert await stays_pending(r2) and not entered.is_set()
        redis.pubsub_.confirm(b"p.results-ready:acme")
        await asyncio.wait_for(entered.wait(), 5)  # after the reader's back-off
        redis.store("acme", {"r2": b"two"})
        assert await r2 == Stored(b"two")

    run_with_waiters(test, timeout_s=5.0)

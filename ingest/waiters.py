"""Request-reply over the pipeline: a future per waiting (tenant, request id).

A waiter is settled by whichever comes first: its id in a notification on its tenant's
channel (persist publishes one per batch and tenant, naming the ids it stored; the waiters
then read the stored values, one ``MGET`` per notification), or the DLQ watcher seeing the
id dead-lettered with that tenant's header. Another tenant using the same id is announced on
another channel and dead-lettered with another header, so it can neither answer nor fail
this waiter.

One Redis pub/sub connection per process, subscribed to the channel of every tenant that
has waited here (tenants come from the configured API keys: a few). The first waiter of a
tenant subscribes; :meth:`ResultWaiters.waiting` returns only once Redis confirmed that
subscription, so a result stored after the request is produced cannot be missed, and the
next waiters of the tenant find it confirmed (no round trip). After a Redis error the
subscriptions count as unconfirmed until Redis confirmed them again (the reader subscribes
again), and the ids still waiting are then looked up once: a notification sent in the gap is
lost, its value is not.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from schemas.keys import ResultKeys, ready_ids

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Stored:
    """The result is in Redis; ``value`` is its MessagePack ``ResultV1``."""

    value: bytes


@dataclass(frozen=True, slots=True)
class DeadLettered:
    """A stage sent the request to the DLQ. ``tenant``: the dead letter's tenant header
    (None: it had none, so the default tenant's)."""

    reason: str
    message: str
    stage: str
    tenant: str | None = None


Outcome = Stored | DeadLettered


class ResultsUnavailable(Exception):
    """Redis did not confirm the subscription in time."""


class ResultWaiters:
    """Futures keyed by (tenant, id), fed by one Redis pub/sub connection (a channel per
    tenant) and the DLQ watcher. Run :meth:`run` as a task for the lifetime of the app."""

    def __init__(
        self, *, client: aioredis.Redis, keys: ResultKeys, confirm_timeout_s: float
    ) -> None:
        self._client = client
        self._pubsub = client.pubsub()
        self._keys = keys
        self._confirm_timeout_s = confirm_timeout_s
        self._waiters: dict[tuple[str, str], list[asyncio.Future[Outcome]]] = {}
        self._ids: dict[str, int] = {}  # waiting (tenant, id) pairs per request id
        self._per_tenant: dict[str, int] = {}  # waiting (tenant, id) pairs per tenant
        self._tenants: dict[bytes, str] = {}  # channel -> tenant, once subscribed here
        # Per channel: resolved when Redis confirms the subscription (again after a reconnect).
        self._confirmed: dict[bytes, asyncio.Future[None]] = {}
        self._renewing: set[bytes] = set()  # lost with a connection, not yet renewed
        self._resubscribe: set[bytes] = set()  # lost, and our SUBSCRIBE not yet sent again
        # redis-py's PubSub opens its connection on first use without a lock: the reader's
        # first PING and a first SUBSCRIBE at the same time would open two, one never read.
        self._opening = asyncio.Lock()

    def is_waiting(self, request_id: str) -> bool:
        """Whether any tenant waits for ``request_id``. Safe from any thread (a dict lookup):
        lets the DLQ watcher skip other ids."""
        return request_id in self._ids

    @contextlib.asynccontextmanager
    async def waiting(self, tenant: str, request_id: str) -> AsyncIterator[asyncio.Future[Outcome]]:
        """Subscribed to the tenant's outcome of ``request_id`` for the duration of the block;
        raises :class:`ResultsUnavailable` when Redis does not confirm the subscription."""
        key = (tenant, request_id)
        future: asyncio.Future[Outcome] = asyncio.get_running_loop().create_future()
        futures = self._waiters.setdefault(key, [])
        futures.append(future)
        if len(futures) == 1:
            self._ids[request_id] = self._ids.get(request_id, 0) + 1
            self._per_tenant[tenant] = self._per_tenant.get(tenant, 0) + 1
        try:
            await self._subscribed(tenant)
            yield future
        finally:
            futures.remove(future)
            if not futures:
                del self._waiters[key]
                _decrement(self._ids, request_id)
                _decrement(self._per_tenant, tenant)

    def settle(self, tenant: str, request_id: str, outcome: Outcome) -> None:
        """Resolve every waiter of the tenant's ``request_id`` (call on the event loop)."""
        for future in self._waiters.get((tenant, request_id), ()):
            if not future.done():
                future.set_result(outcome)

    async def _subscribed(self, tenant: str) -> None:
        """Return once Redis confirmed the subscription to ``tenant``'s channel (subscribing
        if nobody did yet)."""
        channel = self._keys.channel(tenant).encode()
        confirmed = self._confirmed.get(channel)
        try:
            async with asyncio.timeout(self._confirm_timeout_s):
                if confirmed is None:
                    confirmed = asyncio.get_running_loop().create_future()
                    self._confirmed[channel] = confirmed
                    self._tenants[channel] = tenant
                    async with self._opening:
                        await self._pubsub.subscribe(channel)
                await asyncio.shield(confirmed)
        except (TimeoutError, RedisError, OSError) as exc:
            lost = confirmed is not None and not confirmed.done()
            if lost and self._confirmed.get(channel) is confirmed:
                del self._confirmed[channel]  # the next waiter subscribes again
            raise ResultsUnavailable(f"Redis did not confirm the subscription: {exc!r}") from exc

    async def run(self) -> None:
        """Read the pub/sub connection until cancelled; reconnects after Redis errors."""
        while True:
            try:
                await self._connect()
                message = await self._pubsub.get_message(timeout=1.0)
            except (RedisError, OSError) as exc:
                log.warning("result notifications: %r; reconnecting", exc)
                self._unconfirm()
                await asyncio.sleep(0.5)  # back-off before the next connection attempt
                continue
            if message is not None:
                await self._dispatch(message)

    async def _connect(self) -> None:
        """Open the connection if nothing did yet, and subscribe again to what an error may
        have lost. redis-py renews the subscriptions when it reconnects, but not after every
        error (a read that timed out keeps the connection): asking again costs a duplicate
        confirmation at worst, and without one the lost channels would wait forever."""
        if self._pubsub.connection is not None and not self._resubscribe:
            return
        async with self._opening:
            if self._pubsub.connection is None:
                await self._pubsub.ping()  # opens the connection (the PONG is ignored)
            if self._resubscribe:
                channels = sorted(self._resubscribe)
                await self._pubsub.subscribe(*channels)
                self._resubscribe.difference_update(channels)

    def _unconfirm(self) -> None:
        """A Redis error: until the subscriptions are confirmed again, new waiters wait for
        that, and the ids waiting now are looked up once it is confirmed."""
        loop = asyncio.get_running_loop()
        for channel, confirmed in list(self._confirmed.items()):
            if confirmed.done():
                self._confirmed[channel] = loop.create_future()
                self._renewing.add(channel)
            self._resubscribe.add(channel)

    async def _dispatch(self, message: dict[str, object]) -> None:
        channel = message.get("channel")
        if not isinstance(channel, bytes):
            return
        if message["type"] == "subscribe":
            confirmed = self._confirmed.get(channel)
            # A confirmation of a channel confirmed before: redis-py renewed the subscription
            # on a new connection (after an error we saw, or after one it retried itself).
            renewal = channel in self._renewing or (confirmed is not None and confirmed.done())
            self._renewing.discard(channel)
            if confirmed is not None and not confirmed.done():
                confirmed.set_result(None)
            if renewal:
                await self._sweep(channel)
        elif message["type"] == "message" and isinstance(message["data"], bytes):
            await self._notified(channel, message["data"])

    async def _notified(self, channel: bytes, payload: bytes) -> None:
        tenant = self._tenants.get(channel)
        if tenant is None or not self._per_tenant.get(tenant):
            return  # nobody here waits for this tenant's results right now
        try:
            ids = ready_ids(payload)
        except ValueError as exc:
            log.warning("result notifications: ignored a message on %r: %s", channel, exc)
            return
        waiters = self._waiters
        await self._fetch(tenant, [i for i in ids if (tenant, i) in waiters])

    async def _sweep(self, channel: bytes) -> None:
        tenant = self._tenants.get(channel)
        if tenant is not None:
            await self._fetch(tenant, [i for t, i in self._waiters if t == tenant])

    async def _fetch(self, tenant: str, request_ids: list[str]) -> None:
        """Settle the waiters of those of ``request_ids`` that are stored."""
        if not request_ids:
            return
        try:
            values = await self._client.mget([self._keys.key(tenant, i) for i in request_ids])
        except (RedisError, OSError) as exc:
            # Each waiter still reads its key itself when its time is up.
            log.warning("result notifications: reading %d result(s): %r", len(request_ids), exc)
            return
        for request_id, value in zip(request_ids, values, strict=True):
            if isinstance(value, bytes):
                self.settle(tenant, request_id, Stored(value))


def _decrement(counts: dict[str, int], name: str) -> None:
    left = counts.pop(name) - 1
    if left:
        counts[name] = left

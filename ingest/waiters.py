"""Request-reply over the pipeline: a future per waiting (tenant, request id).

A waiter is settled by whichever comes first: persist's ``PUBLISH`` on the tenant's channel
for the id (the stored result), or the DLQ watcher seeing the id dead-lettered with that
tenant's header. Another tenant using the same id has other channels, so it can neither
answer nor fail this waiter. All channels share one Redis pub/sub connection;
:meth:`ResultWaiters.waiting` returns only once Redis confirmed the subscription, so a result
published after the request is produced cannot be missed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import defaultdict, deque
from collections.abc import AsyncIterator
from dataclasses import dataclass

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from schemas.keys import ResultKeys

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
    """Futures keyed by the result channel of (tenant, id), fed by one Redis pub/sub
    connection and the DLQ watcher. Run :meth:`run` as a task for the lifetime of the app."""

    def __init__(
        self, *, client: aioredis.Redis, keys: ResultKeys, confirm_timeout_s: float
    ) -> None:
        self._pubsub = client.pubsub()
        self._keys = keys
        self._confirm_timeout_s = confirm_timeout_s
        self._waiters: dict[bytes, list[asyncio.Future[Outcome]]] = {}
        self._ids: dict[str, int] = {}  # waiting channels per request id, any tenant
        self._confirmations: defaultdict[bytes, deque[asyncio.Future[None]]] = defaultdict(deque)

    def is_waiting(self, request_id: str) -> bool:
        """Whether any tenant waits for ``request_id``. Safe from any thread (a dict lookup):
        lets the DLQ watcher skip other ids."""
        return request_id in self._ids

    @contextlib.asynccontextmanager
    async def waiting(self, tenant: str, request_id: str) -> AsyncIterator[asyncio.Future[Outcome]]:
        """Subscribed to the tenant's outcome of ``request_id`` for the duration of the block."""
        channel = self._channel(tenant, request_id)
        future: asyncio.Future[Outcome] = asyncio.get_running_loop().create_future()
        futures = self._waiters.setdefault(channel, [])
        futures.append(future)
        try:
            if len(futures) == 1:
                self._ids[request_id] = self._ids.get(request_id, 0) + 1
                await self._subscribe(channel)
            yield future
        finally:
            futures.remove(future)
            if not futures:
                del self._waiters[channel]
                self._forget(request_id)
                await self._unsubscribe(channel)

    def settle(self, tenant: str, request_id: str, outcome: Outcome) -> None:
        """Resolve every waiter of the tenant's ``request_id`` (call on the event loop)."""
        self._settle(self._channel(tenant, request_id), outcome)

    def _settle(self, channel: bytes, outcome: Outcome) -> None:
        for future in self._waiters.get(channel, ()):
            if not future.done():
                future.set_result(outcome)

    def _channel(self, tenant: str, request_id: str) -> bytes:
        return self._keys.channel(tenant, request_id).encode()

    def _forget(self, request_id: str) -> None:
        left = self._ids.pop(request_id) - 1
        if left:
            self._ids[request_id] = left

    async def _subscribe(self, channel: bytes) -> None:
        confirmed: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._confirmations[channel].append(confirmed)
        try:
            async with asyncio.timeout(self._confirm_timeout_s):
                await self._pubsub.subscribe(channel)
                await confirmed
        except (TimeoutError, RedisError, OSError) as exc:
            raise ResultsUnavailable(f"Redis did not confirm the subscription: {exc!r}") from exc
        finally:
            with contextlib.suppress(ValueError):
                self._confirmations[channel].remove(confirmed)
            if not self._confirmations[channel]:
                del self._confirmations[channel]

    async def _unsubscribe(self, channel: bytes) -> None:
        with contextlib.suppress(RedisError, OSError):
            await self._pubsub.unsubscribe(channel)

    async def run(self) -> None:
        """Read the pub/sub connection until cancelled; reconnects after Redis errors."""
        while True:
            try:
                if self._pubsub.connection is None:
                    await self._pubsub.ping()  # opens the connection (the PONG is ignored)
                message = await self._pubsub.get_message(timeout=1.0)
            except (RedisError, OSError) as exc:
                log.warning("result notifications: %r; reconnecting", exc)
                await asyncio.sleep(0.5)  # back-off before the next connection attempt
                continue
            if message is not None:
                self._dispatch(message)

    def _dispatch(self, message: dict[str, object]) -> None:
        channel = message.get("channel")
        if not isinstance(channel, bytes):
            return
        if message["type"] == "subscribe":
            pending = self._confirmations.get(channel)
            if pending:
                future = pending.popleft()
                if not future.done():
                    future.set_result(None)
        elif message["type"] == "message" and isinstance(message["data"], bytes):
            self._settle(channel, Stored(message["data"]))

"""Request-reply over the pipeline: a future per waiting request id.

A waiter is settled by whichever comes first: persist's ``PUBLISH`` on the id's Redis channel
(the stored result), or the DLQ watcher seeing the id dead-lettered. All channels share one
Redis pub/sub connection; :meth:`ResultWaiters.waiting` returns only once Redis confirmed the
subscription, so a result published after the request is produced cannot be missed.
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

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Stored:
    """The result is in Redis; ``value`` is its MessagePack ``ResultV1``."""

    value: bytes


@dataclass(frozen=True, slots=True)
class DeadLettered:
    """A stage sent the request to the DLQ."""

    reason: str
    message: str
    stage: str


Outcome = Stored | DeadLettered


class ResultsUnavailable(Exception):
    """Redis did not confirm the subscription in time."""


class ResultWaiters:
    """Futures keyed by request id, fed by one Redis pub/sub connection and the DLQ watcher.

    ``channel_prefix`` is what precedes the id in the channel name (``<prefix>result-ready:``).
    Run :meth:`run` as a task for the lifetime of the app.
    """

    def __init__(
        self, *, client: aioredis.Redis, channel_prefix: str, confirm_timeout_s: float
    ) -> None:
        self._pubsub = client.pubsub()
        self._prefix = channel_prefix
        self._confirm_timeout_s = confirm_timeout_s
        self._waiters: dict[str, list[asyncio.Future[Outcome]]] = {}
        self._confirmations: defaultdict[bytes, deque[asyncio.Future[None]]] = defaultdict(deque)

    def is_waiting(self, request_id: str) -> bool:
        """Safe from any thread (a dict lookup): lets the DLQ watcher skip other ids."""
        return request_id in self._waiters

    @contextlib.asynccontextmanager
    async def waiting(self, request_id: str) -> AsyncIterator[asyncio.Future[Outcome]]:
        """Subscribed to ``request_id``'s outcome for the duration of the block."""
        future: asyncio.Future[Outcome] = asyncio.get_running_loop().create_future()
        futures = self._waiters.setdefault(request_id, [])
        futures.append(future)
        try:
            if len(futures) == 1:
                await self._subscribe(request_id)
            yield future
        finally:
            futures.remove(future)
            if not futures:
                del self._waiters[request_id]
                await self._unsubscribe(request_id)

    def settle(self, request_id: str, outcome: Outcome) -> None:
        """Resolve every waiter of ``request_id`` (call on the event loop)."""
        for future in self._waiters.get(request_id, ()):
            if not future.done():
                future.set_result(outcome)

    async def _subscribe(self, request_id: str) -> None:
        channel = (self._prefix + request_id).encode()
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

    async def _unsubscribe(self, request_id: str) -> None:
        with contextlib.suppress(RedisError, OSError):
            await self._pubsub.unsubscribe(self._prefix + request_id)

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
            request_id = channel.decode(errors="replace")[len(self._prefix) :]
            self.settle(request_id, Stored(message["data"]))

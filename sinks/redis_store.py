"""Redis result store: ``SET <prefix>result:<id>`` with a TTL, and a notification per id.

Writes are idempotent (the same id always maps to the same key, and a replayed result
rewrites the same value), so at-least-once delivery upstream still leaves one entry per id.
``add()`` buffers, ``flush()`` sends the whole batch in one pipeline round trip; the caller
commits its offsets only after ``flush()`` returned.

Waiters (``POST /v1/predict``) subscribe to ``channel(id)`` *before* the request is produced,
then fall back to ``get(id)``; the message published is the stored value itself.
"""

from __future__ import annotations

import redis


class ResultStore:
    """Buffered, pipelined writes of encoded results (MessagePack ``ResultV1`` bytes)."""

    def __init__(self, *, client: redis.Redis, ttl_s: int, prefix: str = "") -> None:
        self._client = client
        self._ttl_s = ttl_s
        self._prefix = prefix
        self._pending: list[tuple[str, bytes]] = []

    def key(self, request_id: str) -> str:
        return f"{self._prefix}result:{request_id}"

    def channel(self, request_id: str) -> str:
        return f"{self._prefix}result-ready:{request_id}"

    def add(self, request_id: str, value: bytes) -> None:
        self._pending.append((request_id, value))

    def flush(self) -> int:
        """Write everything added since the last flush; raises ``redis.RedisError`` if Redis
        did not acknowledge (nothing is dropped from the buffer then: call again)."""
        if not self._pending:
            return 0
        pipe = self._client.pipeline(transaction=False)
        for request_id, value in self._pending:
            pipe.set(self.key(request_id), value, ex=self._ttl_s)
            pipe.publish(self.channel(request_id), value)
        pipe.execute()
        written = len(self._pending)
        self._pending.clear()
        return written

    def discard(self) -> None:
        """Drop buffered writes (the batch will be replayed)."""
        self._pending.clear()

    def get(self, request_id: str) -> bytes | None:
        value = self._client.get(self.key(request_id))
        return value if isinstance(value, bytes) else None

    def get_many(self, request_ids: list[str]) -> list[bytes | None]:
        values = self._client.mget([self.key(i) for i in request_ids])
        return [v if isinstance(v, bytes) else None for v in values]

"""Redis result store: ``SET <prefix>result:<tenant>:<id>`` with a TTL, and a notification
on ``<prefix>result-ready:<tenant>:<id>`` (names in :mod:`schemas.keys`).

Writes are idempotent (the same tenant and id always map to the same key, and a replayed
result rewrites the same value), so at-least-once delivery upstream still leaves one entry
per id. ``add()`` buffers, ``flush()`` sends the whole batch in one pipeline round trip; the
caller commits its offsets only after ``flush()`` returned.

Waiters (``POST /v1/predict``) subscribe to the channel *before* the request is produced,
then fall back to reading the key; the message published is the stored value itself.
"""

from __future__ import annotations

import redis

from schemas.keys import ResultKeys


class ResultStore:
    """Buffered, pipelined writes of encoded results (MessagePack ``ResultV1`` bytes)."""

    def __init__(self, *, client: redis.Redis, ttl_s: int, keys: ResultKeys) -> None:
        self._client = client
        self._ttl_s = ttl_s
        self.keys = keys
        self._pending: list[tuple[str, str, bytes]] = []

    def add(self, tenant: str, request_id: str, value: bytes) -> None:
        self._pending.append((tenant, request_id, value))

    def flush(self) -> int:
        """Write everything added since the last flush; raises ``redis.RedisError`` if Redis
        did not acknowledge (nothing is dropped from the buffer then: call again)."""
        if not self._pending:
            return 0
        pipe = self._client.pipeline(transaction=False)
        for tenant, request_id, value in self._pending:
            pipe.set(self.keys.key(tenant, request_id), value, ex=self._ttl_s)
            pipe.publish(self.keys.channel(tenant, request_id), value)
        pipe.execute()
        written = len(self._pending)
        self._pending.clear()
        return written

    def discard(self) -> None:
        """Drop buffered writes (the batch will be replayed)."""
        self._pending.clear()

    def get(self, tenant: str, request_id: str) -> bytes | None:
        value = self._client.get(self.keys.key(tenant, request_id))
        return value if isinstance(value, bytes) else None

    def get_many(self, tenant: str, request_ids: list[str]) -> list[bytes | None]:
        values = self._client.mget([self.keys.key(tenant, i) for i in request_ids])
        return [v if isinstance(v, bytes) else None for v in values]

"""Redis result store: ``SET <prefix>result:<tenant>:<id> <value> EX <ttl>`` per result, then
one ``PUBLISH <prefix>results-ready:<tenant> <ids>`` per tenant and flush, ``<ids>`` being the
MessagePack array of the ids just stored (names and format in :mod:`schemas.keys`).

Writes are idempotent (the same tenant and id always map to the same key, and a replayed
result rewrites the same value), so at-least-once delivery upstream still leaves one entry
per id. ``add()`` buffers, ``flush()`` sends the whole batch in one write and reads every
reply; the caller commits its offsets only after ``flush()`` returned.

Waiters (``POST /v1/predict``, ``ingest/waiters.py``) subscribe to their tenant's channel
*before* the request is produced, and read the stored value once its id is announced. The
notification follows the writes on the same connection, so Redis has every value of a batch
before anyone hears of it.

Why the commands are packed here rather than through a redis-py pipeline: redis-py's
per-command path (``Pipeline.set`` queues a command object, ``pack_commands`` packs it,
``execute`` parses and post-processes each reply) costs about ten times the CPU per result of
packing the batch's RESP into one buffer (``bench/redis_micro.py``). The connection and the
reply parser (hiredis when installed) are still redis-py's.
"""

from __future__ import annotations

from typing import Any

import redis

from schemas.keys import ResultKeys, ready_message

_SET = b"*5\r\n$3\r\nSET\r\n$%d\r\n%b\r\n$%d\r\n%b\r\n%b"
_PUBLISH = b"*3\r\n$7\r\nPUBLISH\r\n$%d\r\n%b\r\n$%d\r\n%b\r\n"


class ResultStore:
    """Buffered, batched writes of encoded results (MessagePack ``ResultV1`` bytes)."""

    def __init__(self, *, client: redis.Redis, ttl_s: int, keys: ResultKeys) -> None:
        self._client = client
        self._ttl_s = ttl_s
        self.keys = keys
        ttl = str(ttl_s).encode()
        self._ex = b"$2\r\nEX\r\n$%d\r\n%b\r\n" % (len(ttl), ttl)
        self._pending: dict[str, list[tuple[str, bytes]]] = {}  # per tenant: (id, value)
        self._count = 0

    def add(self, tenant: str, request_id: str, value: bytes) -> None:
        writes = self._pending.get(tenant)
        if writes is None:
            writes = self._pending[tenant] = []
        writes.append((request_id, value))
        self._count += 1

    def flush(self) -> int:
        """Write everything added since the last flush and announce it; raises
        ``redis.RedisError`` if Redis did not acknowledge every write (nothing is dropped from
        the buffer then: call again, or :meth:`discard` and add the batch again)."""
        if not self._count:
            return 0
        commands, packed = self._packed()
        self._send(packed, replies=commands)
        written = self._count
        self.discard()
        return written

    def discard(self) -> None:
        """Drop buffered writes (the batch will be replayed)."""
        self._pending.clear()
        self._count = 0

    def _packed(self) -> tuple[int, bytes]:
        """The RESP of every pending ``SET``, then one ``PUBLISH`` per tenant, and how many
        commands that is."""
        parts: list[bytes] = []
        ex = self._ex
        for tenant, writes in self._pending.items():
            prefix = self.keys.key_prefix(tenant).encode()
            for request_id, value in writes:
                key = prefix + request_id.encode()
                parts.append(_SET % (len(key), key, len(value), value, ex))
        for tenant, writes in self._pending.items():
            channel = self.keys.channel(tenant).encode()
            message = ready_message([request_id for request_id, _ in writes])
            parts.append(_PUBLISH % (len(channel), channel, len(message), message))
        return self._count + len(self._pending), b"".join(parts)

    def _send(self, packed: bytes, *, replies: int) -> None:
        """Send ``packed`` and read its ``replies``; raise the first error reply after reading
        them all (the connection stays in step), or whatever broke the connection."""
        pool = self._client.connection_pool
        connection: Any = pool.get_connection()  # redis-py leaves its methods untyped
        try:
            connection.send_packed_command([packed])
            error: redis.ResponseError | None = None
            for _ in range(replies):
                try:
                    connection.read_response()
                except redis.ResponseError as exc:
                    error = error or exc
            if error is not None:
                raise error
        except redis.ResponseError:
            raise
        except BaseException:
            # A reply may be half read: this connection must not serve another command.
            connection.disconnect()
            raise
        finally:
            pool.release(connection)

    def get(self, tenant: str, request_id: str) -> bytes | None:
        value = self._client.get(self.keys.key(tenant, request_id))
        return value if isinstance(value, bytes) else None

    def get_many(self, tenant: str, request_ids: list[str]) -> list[bytes | None]:
        values = self._client.mget([self.keys.key(tenant, i) for i in request_ids])
        return [v if isinstance(v, bytes) else None for v in values]

"""A stand-in for the few ``redis.Redis`` calls the result store makes (unit tests only).

The store sends packed RESP on a pooled connection and reads one reply per command; the fake
connection parses what it is sent (so tests see the commands, not the bytes), applies it, and
answers like Redis.
"""

from __future__ import annotations

from typing import Any

import redis


def parse_resp(packed: bytes) -> list[list[bytes]]:
    """The commands in ``packed``: RESP arrays of bulk strings, as clients send them."""
    commands: list[list[bytes]] = []
    at = 0
    while at < len(packed):
        assert packed[at : at + 1] == b"*", f"not a RESP array at byte {at}"
        end = packed.index(b"\r\n", at)
        count, at = int(packed[at + 1 : end]), end + 2
        args: list[bytes] = []
        for _ in range(count):
            assert packed[at : at + 1] == b"$", f"not a bulk string at byte {at}"
            end = packed.index(b"\r\n", at)
            size, at = int(packed[at + 1 : end]), end + 2
            args.append(packed[at : at + size])
            assert packed[at + size : at + size + 2] == b"\r\n"
            at += size + 2
        commands.append(args)
    return commands


class FakeConnection:
    def __init__(self, client: FakeRedis) -> None:
        self._client = client
        self._replies: list[object] = []
        self.sent: list[bytes] = []
        self.disconnected = False

    def send_packed_command(self, command: list[bytes], check_health: bool = True) -> None:
        failure = self._client.failure
        if failure is not None and not isinstance(failure, redis.ResponseError):
            raise failure
        self.sent.append(b"".join(command))
        for args in parse_resp(self.sent[-1]):
            self._replies.append(self._client.apply(args))

    def read_response(self) -> object:
        reply = self._replies.pop(0)
        if isinstance(reply, redis.ResponseError):
            raise reply
        return reply

    def disconnect(self) -> None:
        self.disconnected = True


class FakePool:
    def __init__(self, client: FakeRedis) -> None:
        self._client = client

    def get_connection(self) -> FakeConnection:
        return FakeConnection(self._client)

    def release(self, connection: FakeConnection) -> None:
        self._client.released.append(connection)


class FakeRedis:
    """Records commands as ``(name, *args)`` with str keys; ``failure`` makes every command
    fail with it (a ``ResponseError`` as an error reply to each write, as OOM does; anything
    else as the connection breaking)."""

    def __init__(self) -> None:
        self.commands: list[tuple[Any, ...]] = []
        self.values: dict[str, bytes] = {}
        self.failure: Exception | None = None
        self.released: list[FakeConnection] = []
        self.connection_pool = FakePool(self)

    def apply(self, args: list[bytes]) -> object:
        name = args[0].decode().lower()
        if name == "set":
            key, value, ex, ttl = args[1].decode(), args[2], args[3].decode(), int(args[4])
            self.commands.append(("set", key, value, (ex.lower(), ttl)))
            if isinstance(self.failure, redis.ResponseError):
                return self.failure
            self.values[key] = value
            return b"OK"
        if name == "publish":
            self.commands.append(("publish", args[1].decode(), args[2]))
            return 0
        raise AssertionError(f"the store sent an unexpected command: {args!r}")

    def get(self, key: str) -> bytes | None:
        return self.values.get(key)

    def mget(self, keys: list[str]) -> list[bytes | None]:
        return [self.values.get(k) for k in keys]

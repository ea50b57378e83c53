"""A stand-in for the few ``redis.Redis`` calls the result store makes (unit tests only)."""

from __future__ import annotations

from typing import Any


class FakePipeline:
    def __init__(self, client: FakeRedis) -> None:
        self._client = client
        self._queued: list[tuple[str, tuple[Any, ...], dict[str, Any]]] = []

    def set(self, *args: Any, **kwargs: Any) -> None:
        self._queued.append(("set", args, kwargs))

    def publish(self, *args: Any, **kwargs: Any) -> None:
        self._queued.append(("publish", args, kwargs))

    def execute(self) -> list[bool]:
        if self._client.failure is not None:
            raise self._client.failure
        for command, args, kwargs in self._queued:
            self._client.commands.append((command, *args, *sorted(kwargs.items())))
            if command == "set":
                self._client.values[args[0]] = args[1]
        return [True] * len(self._queued)


class FakeRedis:
    """Records commands; ``failure`` makes every pipeline ``execute()`` raise it."""

    def __init__(self) -> None:
        self.commands: list[tuple[Any, ...]] = []
        self.values: dict[str, bytes] = {}
        self.failure: Exception | None = None

    def pipeline(self, transaction: bool = True) -> FakePipeline:
        assert transaction is False, "the store must not wrap results in MULTI/EXEC"
        return FakePipeline(self)

    def get(self, key: str) -> bytes | None:
        return self.values.get(key)

    def mget(self, keys: list[str]) -> list[bytes | None]:
        return [self.values.get(k) for k in keys]

"""A real uvicorn server running the ingest app on an ephemeral port, in a thread."""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import httpx
import uvicorn

from streaminfer.ingest_app import create_app
from streaminfer.settings import Settings
from tests.fixtures import wait_until

DIGITS_PIXELS = [float(i % 17) for i in range(64)]


class IngestServer:
    """``uvicorn.Server`` serving ``create_app(settings)`` on 127.0.0.1, port chosen by the OS."""

    def __init__(self, settings: Settings) -> None:
        config = uvicorn.Config(
            create_app(settings),
            host="127.0.0.1",
            port=0,
            log_level="warning",
            lifespan="on",
            # grpc.aio runs on the standard asyncio loop, not uvloop (as `streaminfer ingest`)
            loop="asyncio" if settings.ingest.grpc_port is not None else "auto",
        )
        self.server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self.server.run, name="uvicorn", daemon=True)
        self.url = ""

    def start(self) -> None:
        self._thread.start()
        wait_until(
            lambda: self.server.started or not self._thread.is_alive(), 30, "uvicorn started"
        )
        assert self.server.started, "the ingest app failed to start (see the log above)"
        port = self.server.servers[0].sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"

    def stop(self) -> None:
        self.server.should_exit = True
        self._thread.join(timeout=30)
        assert not self._thread.is_alive(), "uvicorn did not stop"


@contextmanager
def serving(settings: Settings, **changes: dict[str, Any]) -> Iterator[httpx.Client]:
    """An HTTP client bound to a fresh server for ``settings`` with ``changes`` applied
    (per group, as :meth:`Settings.with_changes` takes them)."""
    server = IngestServer(settings.with_changes(**changes))
    server.start()
    try:
        with httpx.Client(base_url=server.url, timeout=30) as client:
            yield client
    finally:
        server.stop()


@contextmanager
def refused_port() -> Iterator[int]:
    """A port that refuses connections: bound (so nothing else takes it), never listening."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        yield sock.getsockname()[1]


def digits_body(request_id: str | None = None, **fields: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"model": "digits", "inputs": {"input": DIGITS_PIXELS}, **fields}
    if request_id is not None:
        body["id"] = request_id
    return body

"""Pure ASGI middleware (no per-request task or body buffering): API keys and metrics."""

from __future__ import annotations

import hmac
import time
from collections.abc import Iterable

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ingest.errors import ApiError, error_response
from ingest.metrics import IngestMetrics


class ApiKeyGuard:
    """With keys configured: 401 without a key, 403 with a wrong one, except ``open_paths``.

    A key is sent as ``X-API-Key: <key>`` or ``Authorization: Bearer <key>``; comparison is
    constant-time.
    """

    def __init__(self, app: ASGIApp, *, keys: Iterable[str], open_paths: Iterable[str]) -> None:
        self._app = app
        self._keys = [key.encode() for key in keys]
        self._open = frozenset(open_paths)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not self._keys or scope["path"] in self._open:
            await self._app(scope, receive, send)
            return
        presented = presented_key(scope["headers"])
        if presented is None:
            error = ApiError(
                401,
                "unauthenticated",
                "an API key is required (X-API-Key or Authorization: Bearer)",
                headers={"WWW-Authenticate": "Bearer"},
            )
        elif not any(hmac.compare_digest(presented, key) for key in self._keys):
            error = ApiError(403, "forbidden", "the API key is not valid")
        else:
            await self._app(scope, receive, send)
            return
        await error_response(error)(scope, receive, send)


def presented_key(headers: Iterable[tuple[bytes, bytes]]) -> bytes | None:
    for name, value in headers:
        if name == b"x-api-key":
            return value
        if name == b"authorization" and value[:7].lower() == b"bearer ":
            return value[7:].strip()
    return None


# Label values come from this set only: a client inventing methods must not invent series.
_METHODS = frozenset({"GET", "POST", "HEAD", "PUT", "PATCH", "DELETE", "OPTIONS"})


class RequestMetrics:
    """Counts every HTTP request by route template and status, and times it."""

    def __init__(self, app: ASGIApp, *, metrics: IngestMetrics) -> None:
        self._app = app
        self._metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self._app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500

        async def send_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self._app(scope, receive, send_status)
        finally:
            # The router stores the matched route in the scope; its template keeps the label
            # set small (/v1/results/{request_id:path}, not one label per id).
            route = getattr(scope.get("route"), "path", "unmatched")
            method = scope["method"] if scope["method"] in _METHODS else "other"
            self._metrics.http_request(
                route=route,
                method=method,
                status=status,
                seconds=time.perf_counter() - started,
            )

"""Pure ASGI middleware (no per-request task or body buffering): API keys and metrics."""

from __future__ import annotations

import hmac
import time
from collections.abc import Iterable, Mapping

from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ingest.errors import ApiError, error_response
from ingest.metrics import IngestMetrics

_TENANT = "streaminfer.tenant"  # the ASGI scope entry holding the request's tenant


def tenant_of(request: Request) -> str:
    """The tenant :class:`ApiKeyGuard` authenticated this request as."""
    return scope_tenant(request.scope)


def scope_tenant(scope: Scope) -> str:
    """:func:`tenant_of` for an ASGI scope."""
    tenant = scope.get(_TENANT)
    if not isinstance(tenant, str):
        raise RuntimeError("ApiKeyGuard must wrap the routes that need a tenant")
    return tenant


class ApiKeyGuard:
    """With keys configured: 401 without a key, 403 with a wrong one, except ``open_paths``;
    a right key's tenant is the request's (:func:`tenant_of`). Without keys every request is
    ``default_tenant``'s.

    ``keys`` maps each key to its tenant. A key is sent as ``X-API-Key: <key>`` or
    ``Authorization: Bearer <key>``; comparison is constant-time.
    """

    def __init__(
        self,
        app: ASGIApp,
        *,
        keys: Mapping[str, str],
        default_tenant: str,
        open_paths: Iterable[str],
    ) -> None:
        self._app = app
        self._keys = [(key.encode(), tenant) for key, tenant in keys.items()]
        self._default_tenant = default_tenant
        self._open = frozenset(open_paths)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            if not self._keys:
                scope[_TENANT] = self._default_tenant
            await self._app(scope, receive, send)
            return
        error = self.admit(scope)
        if error is None:
            await self._app(scope, receive, send)
        else:
            await error_response(error)(scope, receive, send)

    def admit(self, scope: Scope) -> ApiError | None:
        """None when the HTTP request in ``scope`` may pass (its tenant then set for
        :func:`tenant_of`); else the 401 or 403 to answer."""
        if not self._keys:  # open paths with keys on need no tenant: they serve none
            scope[_TENANT] = self._default_tenant
            return None
        if scope["path"] in self._open:
            return None
        presented = presented_key(scope["headers"])
        if presented is None:
            return ApiError(
                401,
                "unauthenticated",
                "an API key is required (X-API-Key or Authorization: Bearer)",
                headers={"WWW-Authenticate": "Bearer"},
            )
        tenant = self._tenant(presented)
        if tenant is None:
            return ApiError(403, "forbidden", "the API key is not valid")
        scope[_TENANT] = tenant
        return None

    def _tenant(self, presented: bytes) -> str | None:
        found = None
        for key, tenant in self._keys:  # every key compared: the time says nothing of which
            if hmac.compare_digest(presented, key):
                found = tenant
        return found


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
        self._metrics.in_flight(1)

        async def send_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self._app(scope, receive, send_status)
        finally:
            request_done(self._metrics, scope, status, started)


def request_done(metrics: IngestMetrics, scope: Scope, status: int, started: float) -> None:
    """Count and time a finished HTTP request (``started``: its ``perf_counter()``)."""
    metrics.in_flight(-1)
    # The router stores the matched route in the scope; its template keeps the label
    # set small (/v1/results/{request_id:path}, not one label per id).
    route = getattr(scope.get("route"), "path", "unmatched")
    method = scope["method"] if scope["method"] in _METHODS else "other"
    metrics.http_request(
        route=route, method=method, status=status, seconds=time.perf_counter() - started
    )

"""The two hot routes as plain ASGI: ``POST /v1/requests`` and ``POST /v1/predict``.

FastAPI's path for one request (its middleware stack, router, dependency solving, ``Request``
objects, a ``send`` wrapper per layer) cost about as much CPU as all our own work on a single
request. :class:`HotRoutes` answers these two routes before FastAPI sees them, doing what the
FastAPI stack did and nothing else, in this order: count the request in flight, check the API
key (:meth:`ApiKeyGuard.admit`, the same 401/403), run the route, turn a domain exception into
its answer (:class:`ErrorAnswers`, the same table as the FastAPI handlers), answer a plain
``500 Internal Server Error`` for anything else and re-raise it (as Starlette's
``ServerErrorMiddleware``), then count and time the request under the route's template.

FastAPI keeps its own definitions of both routes: the OpenAPI document describes them, and
they answer whatever the fast path leaves to them: a predict ``timeout`` that is not a plain
number in range (so that FastAPI's validation error is the answer) and a request under a
``root_path``. What FastAPI's stack does beyond that is skipped: its native OpenTelemetry
server spans (on only under a global tracer provider, which streaminfer never installs: a
request's trace starts at its record, see :mod:`ingest.delivery`) and middleware added
later with ``app.add_middleware``. ``tests/unit/ingest/test_http.py`` sends the same
requests through both stacks and compares status, headers and body.
"""

from __future__ import annotations

import re
import time
from collections.abc import Awaitable, Callable
from typing import Any, Final

import msgspec
from starlette.requests import ClientDisconnect
from starlette.types import Receive, Scope, Send

from ingest.errors import ApiError, ErrorAnswers
from ingest.metrics import IngestMetrics
from ingest.middleware import ApiKeyGuard, request_done, scope_tenant
from ingest.payloads import MSGPACK_TYPES
from ingest.rendering import result_json
from ingest.service import IngestService
from ingest.waiters import DeadLettered, Outcome, Stored

JSON: Final = b"application/json"
MSGPACK: Final = b"application/msgpack"
_ENCODER: Final = msgspec.json.Encoder()
_TIMEOUT_KEY: Final = "streaminfer.timeout"  # the scope entry holding predict's parsed wait
# The only predict query the fast path reads itself; any other goes to FastAPI's route.
_PLAIN_TIMEOUT: Final = re.compile(rb"timeout=(\d{1,9}(?:\.\d{1,9})?)")

# (status, body, content type, extra headers): what a hot route answers.
Answer = tuple[int, bytes, bytes, list[tuple[bytes, bytes]]]
Route = Callable[[Scope, Receive, IngestService], Awaitable[Answer]]


def header(scope: Scope, name: bytes) -> str | None:
    """The first value of header ``name`` (lower case), as Starlette's ``Headers.get``."""
    for key, value in scope["headers"]:
        if key == name:
            return str(value.decode("latin-1"))
    return None


async def read_body(scope: Scope, receive: Receive, limit: int) -> bytes:
    """The body, or a 413 :class:`ApiError` as soon as it is known to exceed ``limit``
    bytes (``Request.stream()`` semantics, ``ClientDisconnect`` included)."""
    declared = header(scope, b"content-length") or ""
    if declared.isdigit() and int(declared) > limit:
        raise too_large(limit)
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.request":
            chunk = message.get("body", b"")
            if chunk:
                size += len(chunk)
                if size > limit:
                    raise too_large(limit)
                chunks.append(chunk)
            if not message.get("more_body", False):
                return chunks[0] if len(chunks) == 1 else b"".join(chunks)
        elif message["type"] == "http.disconnect":
            raise ClientDisconnect()


def too_large(limit: int) -> ApiError:
    return ApiError(413, "body_too_large", f"the body exceeds {limit} bytes")


def wants_msgpack(accept: str | None) -> bool:
    return accept is not None and any(t in accept for t in MSGPACK_TYPES)


def dead_lettered(request_id: str, outcome: DeadLettered) -> ApiError:
    return ApiError(
        422,
        "dead_lettered",
        f"the {outcome.stage} stage dead-lettered the request: {outcome.message}",
        id=request_id,
        reason=outcome.reason,
        stage=outcome.stage,
        errors=[{"path": "$", "reason": outcome.reason, "message": outcome.message}],
    )


def predict_timeout_error(request_id: str, timeout: float) -> ApiError:
    return ApiError(
        504,
        "timeout",
        f"no result within {timeout}s; it stays fetchable at /v1/results/{request_id}",
        id=request_id,
    )


def _error_answer(error: ApiError) -> Answer:
    body = {"error": error.code, "message": error.message, **error.details}
    headers = [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in error.headers.items()]
    return error.status, _ENCODER.encode(body), JSON, headers


class HotRoutes:
    """Answers ``POST /v1/requests`` and ``POST /v1/predict`` (see the module docstring).

    :meth:`match` says whether a request is one of them; the app then awaits
    :meth:`serve`. ``service`` is set once the app's lifespan started it. ``labels`` maps
    each path to the FastAPI route whose template the metrics count it under.
    """

    def __init__(
        self,
        *,
        guard: ApiKeyGuard,
        metrics: IngestMetrics,
        answers: ErrorAnswers,
        max_body_bytes: int,
        predict_timeout_s: float,
        predict_max_timeout_s: float,
    ) -> None:
        self.service: IngestService | None = None
        self.labels: dict[str, Any] = {}
        self._guard = guard
        self._metrics = metrics
        self._answers = answers
        self._limit = max_body_bytes
        self._default_timeout = predict_timeout_s
        self._max_timeout = predict_max_timeout_s
        self._routes: dict[str, Route] = {
            "/v1/requests": self._submit,
            "/v1/predict": self._predict,
        }

    def match(self, scope: Scope) -> Route | None:
        """The route for this request, or None: FastAPI answers it."""
        if scope["type"] != "http" or scope["method"] != "POST" or scope.get("root_path"):
            return None
        route = self._routes.get(scope["path"])
        if route == self._predict:
            timeout = self._timeout(scope["query_string"])
            if timeout is None:
                return None
            scope[_TIMEOUT_KEY] = timeout
        return route

    def _timeout(self, query: bytes) -> float | None:
        if not query:
            return self._default_timeout
        plain = _PLAIN_TIMEOUT.fullmatch(query)
        if plain is None:
            return None
        timeout = float(plain.group(1))
        return timeout if 0 < timeout <= self._max_timeout else None

    async def serve(self, route: Route, scope: Scope, receive: Receive, send: Send) -> None:
        started = time.perf_counter()
        self._metrics.in_flight(1)
        scope["route"] = self.labels.get(scope["path"])
        status = 500
        response_started = False
        try:
            error = self._guard.admit(scope)
            if error is not None:
                answer = _error_answer(error)
            else:
                answer = await self._answer(route, scope, receive)
            status, body, media, headers = answer
            headers.append((b"content-length", str(len(body)).encode()))
            headers.append((b"content-type", media))
            response_started = True
            await send({"type": "http.response.start", "status": status, "headers": headers})
            await send({"type": "http.response.body", "body": body})
        except Exception:
            if not response_started:
                status = 500
                await send(
                    {
                        "type": "http.response.start",
                        "status": 500,
                        "headers": [
                            (b"content-length", b"21"),
                            (b"content-type", b"text/plain; charset=utf-8"),
                        ],
                    }
                )
                await send({"type": "http.response.body", "body": b"Internal Server Error"})
            raise
        finally:
            request_done(self._metrics, scope, status, started)

    async def _answer(self, route: Route, scope: Scope, receive: Receive) -> Answer:
        service = self.service
        if service is None:  # an app served without its lifespan (tests set the state)
            service = scope["app"].state.service
        try:
            return await route(scope, receive, service)
        except Exception as exc:
            error = self._answers.answer(exc)
            if error is None:
                raise
            return _error_answer(error)

    async def _submit(self, scope: Scope, receive: Receive, service: IngestService) -> Answer:
        body = await read_body(scope, receive, self._limit)
        submissions = service.decoder.decode_body(body, header(scope, b"content-type"))
        ids = await service.submit(submissions, tenant=scope_tenant(scope))
        return 202, _ENCODER.encode({"ids": ids}), JSON, []

    async def _predict(self, scope: Scope, receive: Receive, service: IngestService) -> Answer:
        timeout: float = scope[_TIMEOUT_KEY]
        body = await read_body(scope, receive, self._limit)
        (submission,) = service.decoder.decode_body(
            body, header(scope, b"content-type"), batch=False
        )
        outcome: Outcome | None = await service.predict(
            submission, tenant=scope_tenant(scope), timeout_s=timeout
        )
        request_id = submission.request.id
        if isinstance(outcome, Stored):
            return result_answer(header(scope, b"accept"), outcome.value)
        if isinstance(outcome, DeadLettered):
            raise dead_lettered(request_id, outcome)
        raise predict_timeout_error(request_id, timeout)


def result_answer(accept: str | None, value: bytes) -> Answer:
    """A stored result as the client asked: its MessagePack bytes as they are, or JSON."""
    if wants_msgpack(accept):
        return 200, value, MSGPACK, []
    return 200, _ENCODER.encode(result_json(value)), JSON, []

"""The HTTP API (FastAPI, served by uvicorn): ``create_app(config, service_factory)`` builds
one; ``streaminfer/ingest_app.py`` builds both from the settings.

Routes (README "HTTP API" has curl examples):

- ``POST /v1/requests``: one request (object) or a batch (array), JSON or MessagePack;
  202 ``{"ids": [...]}`` once Kafka acknowledged every record.
- ``POST /v1/predict?timeout=S``: one request; 200 with the result, 422 if dead-lettered,
  504 with the id when no result came within ``timeout`` after Kafka's acknowledgement.
- ``GET /v1/results/{id}``: 200 with the result, 404 unknown or expired.

With API keys, each key belongs to a tenant: records carry the tenant in a header and a key
reads, awaits and settles only its tenant's results (``result:<tenant>:<id>``).
- ``/healthz``, ``/readyz``, ``/metrics``; OpenAPI at ``/docs`` and ``/openapi.json``.

Results are JSON with tensors as ``{dtype, shape, values}`` (:mod:`ingest.rendering`), or the
stored MessagePack ``ResultV1`` bytes as they are when the client sends
``Accept: application/msgpack``.
"""

# No `from __future__ import annotations` here: FastAPI reads the route signatures at
# definition time, and the predict timeout's bound comes from the config in scope.
import contextlib
import logging
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Annotated, Any, cast

from fastapi import FastAPI, Path, Query, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from starlette.types import Receive, Scope, Send

from ingest.errors import ApiError, ErrorAnswers, install_handlers, json_response
from ingest.hot import HotRoutes, dead_lettered, predict_timeout_error, result_answer, too_large
from ingest.metrics import IngestMetrics, PrometheusIngestMetrics
from ingest.middleware import ApiKeyGuard, RequestMetrics, tenant_of
from ingest.openapi import build_openapi, error_responses, request_body
from ingest.service import IngestService
from ingest.waiters import DeadLettered, Stored

log = logging.getLogger(__name__)
PROBES = ("/healthz", "/readyz", "/v2/health/live", "/v2/health/ready")  # open without a key
DOCS = ("/docs", "/docs/oauth2-redirect", "/openapi.json")
_NO_KEY: dict[str, Any] = {"security": []}
ServiceFactory = Callable[[IngestMetrics], IngestService]
# Runs beside the service for the app's lifetime (entered after it started, left before it
# closes): another door sharing the service, e.g. the gRPC server of ingest/oip_grpc.py.
Companion = Callable[[FastAPI, IngestService], contextlib.AbstractAsyncContextManager[None]]


@dataclass(frozen=True)
class HttpConfig:
    """What the HTTP layer needs: limits, timeouts, Retry-After values and the API keys."""

    max_body_bytes: int  # 413 above
    predict_timeout_s: float  # /v1/predict's default wait
    predict_max_timeout_s: float  # the longest wait a client may ask for
    busy_retry_after_s: int  # Retry-After of a 429
    unavailable_retry_after_s: int  # Retry-After of a 503
    default_tenant: str  # every request's tenant when there are no keys
    api_keys: Mapping[str, str] = field(default_factory=dict)  # key -> tenant; empty: open
    public_docs: bool = False  # /docs and /openapi.json without a key


class IngestApi(FastAPI):
    """FastAPI with the msgspec-derived OpenAPI document (see :mod:`ingest.openapi`), and
    the hot routes answered as plain ASGI before FastAPI's stack (see :mod:`ingest.hot`)."""

    api_keys_enabled = False
    hot: HotRoutes | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        route = self.hot.match(scope) if self.hot is not None else None
        if route is None:
            await super().__call__(scope, receive, send)
            return
        scope["app"] = self
        await self.hot.serve(route, scope, receive, send)  # type: ignore[union-attr]

    def openapi(self) -> dict[str, Any]:
        if self.openapi_schema is None:
            self.openapi_schema = build_openapi(self, api_keys=self.api_keys_enabled)
        return self.openapi_schema


def create_app(
    config: HttpConfig,
    *,
    service_factory: ServiceFactory,
    companions: Sequence[Companion] = (),
) -> FastAPI:
    """The ingest app. ``service_factory`` makes its service (Kafka and Redis clients) at
    startup (lifespan), inside the worker process, handed the app's metrics; ``companions``
    run beside it (see :data:`Companion`)."""
    registry = CollectorRegistry()
    app = IngestApi(
        title="streaminfer ingest",
        version="1",
        description="Send inference requests over HTTP; read results. See the README.",
        lifespan=_lifespan(service_factory, companions),
    )
    metrics = PrometheusIngestMetrics(registry=registry, queue_depth=lambda: _queue_depth(app))
    app.state.metrics = metrics
    app.state.registry = registry
    app.api_keys_enabled = bool(config.api_keys)
    guard: dict[str, Any] = {
        "keys": config.api_keys,
        "default_tenant": config.default_tenant,
        "open_paths": PROBES + (DOCS if config.public_docs else ()),
    }
    app.add_middleware(ApiKeyGuard, **guard)
    app.add_middleware(RequestMetrics, metrics=metrics)  # outermost: counts 401s too
    answers = ErrorAnswers(
        busy_retry_s=config.busy_retry_after_s,
        unavailable_retry_s=config.unavailable_retry_after_s,
    )
    install_handlers(app, answers)
    _add_routes(app, config)
    app.hot = HotRoutes(
        guard=ApiKeyGuard(_unused, **guard),
        metrics=metrics,
        answers=answers,
        max_body_bytes=config.max_body_bytes,
        predict_timeout_s=config.predict_timeout_s,
        predict_max_timeout_s=config.predict_max_timeout_s,
    )
    for route in app.routes:  # the metrics count hot requests under FastAPI's templates
        if getattr(route, "path", None) in ("/v1/requests", "/v1/predict"):
            app.hot.labels[route.path] = route  # type: ignore[attr-defined]
    return app


async def _unused(scope: Scope, receive: Receive, send: Send) -> None:
    raise RuntimeError("the hot routes call ApiKeyGuard.admit, never the guard as an app")


def _lifespan(service_factory: ServiceFactory, companions: Sequence[Companion]) -> Any:
    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        service = service_factory(app.state.metrics)
        await service.start()
        app.state.service = service
        if isinstance(app, IngestApi) and app.hot is not None:
            app.hot.service = service
        try:
            async with contextlib.AsyncExitStack() as stack:
                for companion in companions:
                    await stack.enter_async_context(companion(app, service))
                yield
        finally:
            await service.close()

    return lifespan


def _service(request: Request) -> IngestService:
    return cast(IngestService, request.app.state.service)


def _queue_depth(app: IngestApi) -> int:
    service = app.hot.service if app.hot is not None else None
    if service is None:  # an app served without its lifespan (tests set the state)
        service = getattr(app.state, "service", None)
    return service.producer.queue_depth() if service is not None else 0


async def read_body(request: Request, limit: int) -> bytes:
    """The body, or 413 as soon as it is known to exceed ``limit`` bytes."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise too_large(limit)
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise too_large(limit)
        chunks.append(chunk)
    return b"".join(chunks)


def result_response(request: Request, value: bytes, status: int = 200) -> Response:
    _status, body, media, _headers = result_answer(request.headers.get("accept"), value)
    return Response(body, status_code=status, media_type=media.decode())


def _add_routes(app: FastAPI, config: HttpConfig) -> None:
    limit = config.max_body_bytes

    @app.post(
        "/v1/requests",
        status_code=202,
        summary="Send one request or a batch; 202 once Kafka holds every record",
        openapi_extra=request_body(batch=True),
        responses={
            202: {"description": "every record acknowledged by Kafka: `{ids: [...]}`"},
            **error_responses(401, 403, 413, 415, 422, 429, 503),
        },
    )
    async def submit(request: Request) -> Response:
        service = _service(request)
        body = await read_body(request, limit)
        submissions = service.decoder.decode_body(body, request.headers.get("content-type"))
        ids = await service.submit(submissions, tenant=tenant_of(request))
        return json_response(202, {"ids": ids})

    @app.post(
        "/v1/predict",
        summary="Send one request and wait for its result",
        openapi_extra=request_body(batch=False),
        responses={
            200: {"description": "the result (ResultJson)"},
            **error_responses(401, 403, 413, 415, 422, 429, 503, 504),
        },
    )
    async def predict(
        request: Request,
        timeout: Annotated[
            float,
            Query(gt=0, le=config.predict_max_timeout_s, description="seconds to wait"),
        ] = config.predict_timeout_s,
    ) -> Response:
        service = _service(request)
        body = await read_body(request, limit)
        (submission,) = service.decoder.decode_body(
            body, request.headers.get("content-type"), batch=False
        )
        outcome = await service.predict(submission, tenant=tenant_of(request), timeout_s=timeout)
        request_id = submission.request.id
        if isinstance(outcome, Stored):
            return result_response(request, outcome.value)
        if isinstance(outcome, DeadLettered):
            raise dead_lettered(request_id, outcome)
        raise predict_timeout_error(request_id, timeout)

    @app.get(
        "/v1/results/{request_id:path}",  # :path: ids may contain slashes
        summary="The result of a request",
        responses={200: {"description": "the result (ResultJson)"}, **error_responses(404)},
    )
    async def result(
        request: Request, request_id: Annotated[str, Path(min_length=1, max_length=256)]
    ) -> Response:
        value = await _service(request).result(tenant_of(request), request_id)
        if value is None:
            raise ApiError(404, "not_found", f"no result for {request_id!r}", id=request_id)
        return result_response(request, value)

    _add_operational_routes(app)


def _add_operational_routes(app: FastAPI) -> None:
    @app.get("/healthz", summary="The process is alive", openapi_extra=_NO_KEY)
    async def healthz() -> Response:
        return json_response(200, {"status": "ok"})

    @app.get(
        "/readyz",
        summary="Kafka metadata and Redis PING succeed",
        openapi_extra=_NO_KEY,
        responses={503: {"description": "a dependency is unreachable (the body says which)"}},
    )
    async def readyz(request: Request) -> Response:
        checks = await _service(request).readiness()
        ready = all(state == "ok" for state in checks.values())
        return json_response(200 if ready else 503, {"ready": ready, **checks})

    @app.get("/metrics", summary="Prometheus metrics")
    async def metrics(request: Request) -> Response:
        registry = request.app.state.registry
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

"""HTTP error responses: one JSON shape for every error the API returns.

``{"error": <code>, "message": <sentence>, ...details}``; 422 (and the 413 of a request too
large for the pipeline) adds ``errors``, a list of ``{path, reason, message}`` (``path`` like
``$[3].inputs.input``, ``reason`` a DLQ reason code or ``too_large``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import Any

import msgspec
from fastapi import FastAPI, Request, Response
from fastapi.exceptions import RequestValidationError
from redis.exceptions import RedisError

from ingest.delivery import QueueFull
from ingest.payloads import BatchTooLarge, InvalidBody, RequestTooLarge, UnsupportedMediaType
from ingest.service import KafkaUnavailable, NotAcknowledged, Overloaded
from ingest.waiters import ResultsUnavailable

log = logging.getLogger(__name__)
_JSON = msgspec.json.Encoder()


class ApiError(Exception):
    """An error answer: raise it from a route, the app turns it into the response."""

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        *,
        headers: Mapping[str, str] | None = None,
        **details: Any,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = dict(headers or {})
        self.details = details


def json_response(status: int, body: Any, headers: Mapping[str, str] | None = None) -> Response:
    return Response(
        content=_JSON.encode(body),
        status_code=status,
        media_type="application/json",
        headers=headers,
    )


def error_response(error: ApiError) -> Response:
    body = {"error": error.code, "message": error.message, **error.details}
    return json_response(error.status, body, error.headers)


class ErrorAnswers:
    """The HTTP answer (an :class:`ApiError`) to each domain exception raised below the
    routes; one table for the FastAPI handlers and the plain ASGI routes (:mod:`ingest.hot`)."""

    def __init__(self, *, busy_retry_s: int, unavailable_retry_s: int) -> None:
        self.by_type: dict[type[Exception], Callable[[Any], ApiError]] = {
            ApiError: lambda e: e,
            InvalidBody: lambda e: _field_errors(422, "invalid_request", e),
            RequestTooLarge: lambda e: _field_errors(413, "request_too_large", e),
            BatchTooLarge: lambda e: ApiError(413, "batch_too_large", str(e)),
            UnsupportedMediaType: lambda e: ApiError(415, "unsupported_media_type", str(e)),
            QueueFull: lambda e: ApiError(
                429, "overloaded", f"{e}; retry later", headers={"Retry-After": str(busy_retry_s)}
            ),
            Overloaded: lambda e: _not_acknowledged(429, "overloaded", e, busy_retry_s),
            KafkaUnavailable: lambda e: _not_acknowledged(
                503, "kafka_unavailable", e, unavailable_retry_s
            ),
            ResultsUnavailable: lambda e: _unavailable(
                "redis_unavailable", str(e), unavailable_retry_s
            ),
            RedisError: lambda e: _unavailable("redis_unavailable", repr(e), unavailable_retry_s),
            RequestValidationError: _from_validation_error,
        }

    def answer(self, exc: Exception) -> ApiError | None:
        """The answer to ``exc`` (its nearest class in the table, as Starlette looks handlers
        up), or None when it is no domain exception (a bug: 500)."""
        for cls in type(exc).__mro__:
            to_error = self.by_type.get(cls)
            if to_error is not None:
                return to_error(exc)
        return None


def install_handlers(app: FastAPI, answers: ErrorAnswers) -> None:
    """Map the domain exceptions raised below the FastAPI routes to their HTTP answers."""
    for exc_type, to_error in answers.by_type.items():
        app.add_exception_handler(exc_type, _handler(to_error))


def _handler(to_error: Any) -> Any:
    async def handle(_request: Request, exc: Exception) -> Response:
        return error_response(to_error(exc))

    return handle


def _not_acknowledged(status: int, code: str, exc: NotAcknowledged, retry_s: int) -> ApiError:
    """Part of a batch is not in Kafka: name what is and what is not, so a client resends
    only the failed ids."""
    message = f"{exc}; retry them later" if status == 429 else str(exc)
    return ApiError(
        status,
        code,
        message,
        headers={"Retry-After": str(retry_s)},
        acknowledged=exc.acknowledged,
        failed=sorted(exc.failed),
    )


def _field_errors(status: int, code: str, exc: InvalidBody) -> ApiError:
    errors = [{"path": f.path, "reason": f.reason, "message": f.message} for f in exc.errors]
    return ApiError(status, code, str(exc), errors=errors)


def _unavailable(code: str, message: str, retry_s: int) -> ApiError:
    return ApiError(503, code, message, headers={"Retry-After": str(retry_s)})


def _from_validation_error(exc: RequestValidationError) -> ApiError:
    """FastAPI's parameter errors (e.g. ``?timeout=abc``) in the API's own error shape."""
    errors = [
        {
            "path": ".".join(str(p) for p in e.get("loc", ())),
            "reason": "malformed",
            "message": e.get("msg", ""),
        }
        for e in exc.errors()
    ]
    return ApiError(422, "invalid_request", "invalid parameters", errors=errors)

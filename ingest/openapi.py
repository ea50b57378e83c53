"""The OpenAPI document: the message schemas come from the msgspec Structs themselves.

Routes read raw bodies (JSON or MessagePack, decoded by msgspec), so FastAPI cannot infer
their schemas; :func:`install_openapi` adds them as components, plus the HTTP-only forms
(``key``, optional ``id``/``created_at``, tensors as ``values`` lists) and the error shape.
Health probes declare ``security: []``: they never need a key.
"""

from __future__ import annotations

import copy
from typing import Any, Final

import msgspec
from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

from schemas import RequestV1, ResultV1

_REF = "#/components/schemas/{name}"


def ref(name: str) -> dict[str, str]:
    return {"$ref": _REF.format(name=name)}


def _http_schemas(base: dict[str, Any]) -> dict[str, Any]:
    request = copy.deepcopy(base["RequestV1"])
    request["title"] = "SubmitRequest"
    request["description"] = (
        "RequestV1 as sent over HTTP. `id` (idempotency key) defaults to a generated one, "
        "`created_at` to the time received; `key` is the partition key (default: the id). "
        "Each input is a wire Tensor (base64 `data`), a TensorValues, or a nested number list."
    )
    request["required"] = ["model", "inputs"]
    request["properties"]["key"] = {"type": "string", "minLength": 1, "maxLength": 256}
    request["properties"]["inputs"]["additionalProperties"] = {
        "anyOf": [ref("Tensor"), ref("TensorValues"), {"type": "array", "items": {}}]
    }
    result = copy.deepcopy(base["ResultV1"])
    result["title"] = "ResultJson"
    result["description"] = "ResultV1 with every output as TensorValues (nested lists)."
    result["properties"]["outputs"]["additionalProperties"] = ref("TensorValues")
    return {
        "SubmitRequest": request,
        "ResultJson": result,
        "TensorValues": {
            "type": "object",
            "description": "A tensor as numbers: `values` nested (or flat with `shape`); "
            "`dtype` defaults to the model's declared input dtype.",
            "properties": {
                "dtype": base["Tensor"]["properties"]["dtype"],
                "shape": base["Tensor"]["properties"]["shape"],
                "values": {"type": "array", "items": {}},
            },
            "required": ["values"],
            "additionalProperties": False,
        },
        "Error": {
            "type": "object",
            "properties": {
                "error": {"type": "string"},
                "message": {"type": "string"},
                "errors": {"type": "array", "items": ref("FieldError")},
            },
            "required": ["error", "message"],
        },
        "FieldError": {
            "type": "object",
            "properties": {
                "path": {"type": "string", "example": "$[3].inputs.input"},
                "reason": {"type": "string", "example": "signature_mismatch"},
                "message": {"type": "string"},
            },
        },
    }


def request_body(*, batch: bool) -> dict[str, Any]:
    """``openapi_extra`` for a route whose body is one request (or a batch of them)."""
    schema: dict[str, Any] = ref("SubmitRequest")
    if batch:
        schema = {"anyOf": [schema, {"type": "array", "items": schema, "minItems": 1}]}
    content = {
        "application/json": {"schema": schema},
        "application/msgpack": {"schema": schema},
    }
    return {"requestBody": {"required": True, "content": content}}


def error_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    return {
        status: {
            "description": _ERROR_TEXT[status],
            "content": {"application/json": {"schema": ref("Error")}},
        }
        for status in statuses
    }


_ERROR_TEXT: Final = {
    401: "no API key (when keys are configured)",
    403: "wrong API key",
    404: "no such result (unknown id, or expired)",
    413: "body over the size limit, too many requests in one batch, or a request too large "
    "for the pipeline (`request_too_large`: `errors` names it, reason `too_large`)",
    415: "body neither JSON nor MessagePack",
    422: "invalid request (including bodies nested too deeply, numbers out of range, "
    "impossible shapes, absurd times): `errors` gives each field path and reason; for "
    "predict also a dead-lettered request (`reason` is the DLQ reason)",
    429: "the producer queue is full (backpressure); retry after `Retry-After` seconds",
    503: "Kafka (or Redis) did not answer in time; nothing without an acknowledgement is "
    "reported accepted. Retry after `Retry-After` seconds",
    504: "predict: no result within the timeout; fetch it later at /v1/results/{id}",
}


def build_openapi(app: FastAPI, *, api_keys: bool) -> dict[str, Any]:
    """FastAPI's document for ``app`` plus the msgspec components and security schemes."""
    document = get_openapi(
        title=app.title, version=app.version, description=app.description, routes=app.routes
    )
    _, base = msgspec.json.schema_components([RequestV1, ResultV1], ref_template=_REF)
    schemas = document.setdefault("components", {}).setdefault("schemas", {})
    schemas.update(base)
    schemas.update(_http_schemas(base))
    if api_keys:
        document["components"]["securitySchemes"] = {
            "ApiKey": {"type": "apiKey", "in": "header", "name": "X-API-Key"},
            "Bearer": {"type": "http", "scheme": "bearer"},
        }
        document["security"] = [{"ApiKey": []}, {"Bearer": []}]
    return document

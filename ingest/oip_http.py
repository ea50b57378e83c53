"""The Open Inference Protocol (KServe v2) over HTTP, beside our own ``/v1`` API.

Routes (the README's "Open Inference Protocol" section has curl and tritonclient examples):

- ``GET /v2``: server metadata; ``GET /v2/health/live``, ``GET /v2/health/ready``: 200 when
  true, 400 when false (the protocol's "4xx is false"); both open without an API key, like
  ``/healthz`` and ``/readyz``.
- ``GET /v2/models/{m}[/versions/{v}]``: model metadata from its ``model.yaml``;
  ``.../ready``: 200, or 404 for a model or version we do not have.
- ``POST /v2/models/{m}[/versions/{v}]/infer``: a v2 request (JSON, optionally followed by
  binary tensor data, ``Inference-Header-Content-Length`` giving the JSON's length); waits
  like ``/v1/predict`` (``?timeout=S`` seconds, or the request parameter ``timeout`` in
  microseconds) and answers the v2 response, 504 ``{"error", "id", "ids"}`` when a result did
  not come in time, 400 with the DLQ reason when a stage dead-lettered it.

Errors are ``{"error": "<message>", ...}`` as the protocol has them.
"""

# No `from __future__ import annotations`: FastAPI reads the route signatures at definition.
import contextlib
import dataclasses
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Annotated, Any, Final

import msgspec
from fastapi import FastAPI, Query, Request, Response
from msgspec import Meta, Struct

from ingest.app import HttpConfig, read_body
from ingest.errors import ApiError, json_response
from ingest.middleware import tenant_of
from ingest.oip import (
    SERVICE_ERRORS,
    InferRequest,
    InferResponse,
    InputTensor,
    OipError,
    OipGateway,
    OipLimits,
    RequestedOutput,
    ServerMetadata,
    input_from_data,
    input_from_raw,
    model_metadata,
    model_ready,
    raw_bytes,
    service_error,
)
from ingest.oip_grpc import GrpcConfig, serving_grpc
from ingest.service import IngestService
from schemas.models import ModelCatalog

HEADER_LENGTH: Final = "inference-header-content-length"
OPEN_PATHS: Final = ("/v2/health/live", "/v2/health/ready")
_MAX_NESTING: Final = 40  # deeper `data` is refused before numpy sees it

Parameter = bool | int | float | str


class _InputJson(Struct, forbid_unknown_fields=True):
    name: str
    shape: list[Annotated[int, Meta(ge=0)]]
    datatype: str
    parameters: dict[str, Parameter] = {}
    data: Any = None


class _OutputJson(Struct, forbid_unknown_fields=True):
    name: str
    parameters: dict[str, Parameter] = {}


class _RequestJson(Struct, forbid_unknown_fields=True):
    inputs: list[_InputJson]
    id: str | None = None
    parameters: dict[str, Parameter] = {}
    outputs: list[_OutputJson] | None = None


_REQUEST: Final = msgspec.json.Decoder(_RequestJson)
_JSON: Final = msgspec.json.Encoder()


class OipDoor:
    """The Open Inference Protocol beside the ingest API: :meth:`mount` adds the v2 HTTP
    routes to the app, :meth:`companion` (one of ``create_app``'s ``companions``) builds
    their gateway at startup and, with ``grpc``, serves the gRPC door beside them (its bound
    port in ``app.state.grpc_port``). ``max_rows``: the most rows (batch size) one v2 request
    may carry."""

    def __init__(
        self,
        config: HttpConfig,
        *,
        catalog: ModelCatalog,
        max_rows: int,
        grpc: GrpcConfig | None,
    ) -> None:
        self._config = config
        self._catalog = catalog
        self._grpc = grpc
        self._gateway = GatewayRef()
        self._limits = OipLimits(
            default_timeout_s=config.predict_timeout_s,
            max_timeout_s=config.predict_max_timeout_s,
            max_rows=max_rows,
        )

    def mount(self, app: FastAPI) -> None:
        add_oip_routes(app, self._config, self._gateway)

    @contextlib.asynccontextmanager
    async def companion(self, app: FastAPI, service: IngestService) -> AsyncIterator[None]:
        gateway = OipGateway(service=service, catalog=self._catalog, limits=self._limits)
        self._gateway.value = gateway
        try:
            if self._grpc is None:
                yield
                return
            async with serving_grpc(gateway, self._grpc) as port:
                app.state.grpc_port = port
                yield
        finally:
            self._gateway.value = None


class GatewayRef:
    """The gateway, set at startup: the service it drives exists only inside the lifespan."""

    def __init__(self) -> None:
        self.value: OipGateway | None = None

    def __call__(self) -> OipGateway:
        if self.value is None:
            raise OipError(503, "the server is starting")
        return self.value


def add_oip_routes(app: FastAPI, config: HttpConfig, gateway: GatewayRef) -> None:
    """Mount the v2 routes on ``app``."""
    _add_server_routes(app, gateway)
    for suffix in ("", "/versions/{version}"):
        _add_model_routes(app, config, gateway, f"/v2/models/{{model}}{suffix}")


async def _v2(work: Callable[[], Awaitable[Response]]) -> Response:
    """``work()``'s response, or its failure as a v2 error (``{"error": ...}``)."""
    try:
        return await work()
    except OipError as exc:
        return json_response(exc.status, exc.body())
    except ApiError as exc:  # read_body's 413
        return json_response(exc.status, {"error": exc.message}, exc.headers)
    except SERVICE_ERRORS as exc:
        error = service_error(exc)
        return json_response(error.status, error.body())


def _add_server_routes(app: FastAPI, gateway: GatewayRef) -> None:
    @app.get("/v2", summary="v2: server metadata", tags=["v2"])
    async def server_metadata() -> Response:
        meta = ServerMetadata()
        body = {"name": meta.name, "version": meta.version, "extensions": list(meta.extensions)}
        return json_response(200, body)

    @app.get("/v2/health/live", summary="v2: the server is live", tags=["v2"])
    async def live() -> Response:
        return json_response(200, {"live": True})

    @app.get("/v2/health/ready", summary="v2: Kafka and Redis answer", tags=["v2"])
    async def ready() -> Response:
        async def check() -> Response:
            is_ready = await gateway().server_ready()
            return json_response(200 if is_ready else 400, {"ready": is_ready})

        return await _v2(check)


def _add_model_routes(app: FastAPI, config: HttpConfig, gateway: GatewayRef, path: str) -> None:
    limit = config.max_body_bytes

    @app.get(path, summary="v2: model metadata", tags=["v2"])
    async def metadata(model: str, version: str | None = None) -> Response:
        async def describe() -> Response:
            meta = model_metadata(gateway().catalog, model, version)
            return json_response(200, msgspec.to_builtins(meta))

        return await _v2(describe)

    @app.get(f"{path}/ready", summary="v2: the model is ready", tags=["v2"])
    async def model_is_ready(model: str, version: str | None = None) -> Response:
        async def check() -> Response:
            if not model_ready(gateway().catalog, model, version):
                raise OipError(404, f"model {model!r} version {version!r} is not available")
            return json_response(200, {"name": model, "ready": True})

        return await _v2(check)

    @app.post(
        f"{path}/infer",
        summary="v2: run an inference through the pipeline and wait for its result",
        tags=["v2"],
    )
    async def infer(
        request: Request,
        model: str,
        version: str | None = None,
        timeout: Annotated[
            float | None,
            Query(gt=0, le=config.predict_max_timeout_s, description="seconds to wait"),
        ] = None,
    ) -> Response:
        async def run() -> Response:
            body = await read_body(request, limit)
            header_length = request.headers.get(HEADER_LENGTH)
            parsed = parse_infer_request(body, header_length, model=model, version=version)
            if timeout is not None:
                parsed = dataclasses.replace(parsed, timeout_s=timeout)
            answer = await gateway().infer(parsed, tenant=tenant_of(request))
            return infer_response(answer)

        return await _v2(run)


# ---------------------------------------------------------------- requests


def parse_infer_request(
    body: bytes, header_length: str | None, *, model: str, version: str | None
) -> InferRequest:
    """A v2 JSON request, with the binary tensor data after the JSON when
    ``header_length`` (``Inference-Header-Content-Length``) is given."""
    document, binary = _split_body(body, header_length)
    try:
        parsed = _REQUEST.decode(document)
    except msgspec.ValidationError as exc:
        raise OipError(400, f"invalid inference request: {exc}") from None
    except (msgspec.DecodeError, RecursionError) as exc:
        raise OipError(400, f"the inference request is not valid JSON: {exc}") from None
    binary_output = parsed.parameters.get("binary_data_output") is True
    return InferRequest(
        model=model,
        version=version,
        id=parsed.id or None,
        inputs=_inputs(parsed.inputs, binary),
        outputs=_outputs(parsed.outputs, binary_output),
        key=_key(parsed.parameters),
        timeout_s=_timeout_param(parsed.parameters),
        binary_output=binary_output,
    )


def _split_body(body: bytes, header_length: str | None) -> tuple[bytes, memoryview]:
    if header_length is None:
        return body, memoryview(b"")
    if not header_length.isdigit() or int(header_length) > len(body):
        raise OipError(
            400, f"Inference-Header-Content-Length {header_length!r} does not fit the body"
        )
    size = int(header_length)
    return body[:size], memoryview(body)[size:]


def _inputs(inputs: list[_InputJson], binary: memoryview) -> tuple[InputTensor, ...]:
    """Each input from its ``data``, or from the next ``binary_data_size`` bytes."""
    tensors, offset = [], 0
    for given in inputs:
        size = given.parameters.get("binary_data_size")
        if size is None:
            if given.data is None:
                raise OipError(400, f"input {given.name!r} has neither data nor binary data")
            _check_nesting(given.name, given.data)
            tensors.append(input_from_data(given.name, given.datatype, given.shape, given.data))
            continue
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise OipError(400, f"input {given.name!r}: binary_data_size must be an integer")
        if offset + size > len(binary):
            raise OipError(400, f"input {given.name!r}: the body ends before its binary data")
        raw = bytes(binary[offset : offset + size])
        offset += size
        tensors.append(input_from_raw(given.name, given.datatype, given.shape, raw))
    if offset != len(binary):
        raise OipError(400, f"{len(binary) - offset} bytes of binary data belong to no input")
    return tuple(tensors)


def _check_nesting(name: str, data: Any) -> None:
    """numpy refuses more than 64 dimensions with an error of its own: say it first."""
    depth = 0
    while isinstance(data, list) and data:
        depth += 1
        data = data[0]
        if depth > _MAX_NESTING:
            raise OipError(400, f"input {name!r}: data is nested too deeply")


def _outputs(
    outputs: list[_OutputJson] | None, binary_default: bool
) -> tuple[RequestedOutput, ...] | None:
    if outputs is None:
        return None
    return tuple(
        RequestedOutput(o.name, o.parameters.get("binary_data", binary_default) is True)
        for o in outputs
    )


def _key(parameters: dict[str, Parameter]) -> str | None:
    key = parameters.get("key")
    if key is None:
        return None
    if not isinstance(key, str) or not 0 < len(key) <= 256:
        raise OipError(400, "parameter key must be a string of 1-256 characters")
    return key


def _timeout_param(parameters: dict[str, Parameter]) -> float | None:
    """Triton's request parameter ``timeout``: microseconds."""
    value = parameters.get("timeout")
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
        raise OipError(400, "parameter timeout must be a positive number of microseconds")
    return float(value) / 1e6


# ---------------------------------------------------------------- responses


def infer_response(answer: InferResponse) -> Response:
    """The v2 response: JSON, or JSON followed by the binary outputs."""
    outputs, buffers = [], []
    for tensor in answer.outputs:
        entry: dict[str, Any] = {
            "name": tensor.name,
            "datatype": tensor.datatype,
            "shape": list(tensor.shape),
        }
        if tensor.binary:
            raw = raw_bytes(tensor.array)
            entry["parameters"] = {"binary_data_size": len(raw)}
            buffers.append(raw)
        else:
            entry["data"] = tensor.array.ravel().tolist()
        outputs.append(entry)
    document = {
        "model_name": answer.model_name,
        "model_version": answer.model_version,
        "id": answer.id,
        "outputs": outputs,
    }
    header = _JSON.encode(document)
    if not buffers:
        return Response(header, media_type="application/json")
    return Response(
        header + b"".join(buffers),
        media_type="application/octet-stream",
        headers={"Inference-Header-Content-Length": str(len(header))},
    )

"""The Open Inference Protocol (KServe v2) over gRPC: ``inference.GRPCInferenceService``.

Served by ``streaminfer ingest --grpc-port N`` in the same process and event loop as the HTTP
API (a ``grpc.aio`` server started and stopped by the app's lifespan), so both doors share one
:class:`ingest.service.IngestService`: the same producer, result waiters and DLQ watcher.
The messages and stubs are generated from ``ingest/grpc_v2/grpc_predict_v2.proto``
(``make proto``).

``ServerLive`` and ``ServerReady`` are open; every other call needs an API key when keys are
configured, sent as metadata ``x-api-key: <key>`` or ``authorization: Bearer <key>`` (the
HTTP headers' names), and runs as the key's tenant. ``ModelInfer`` waits as long as the
call's deadline allows (at most the longest predict wait), or the request parameter
``timeout`` (microseconds) when given, else the default predict wait. Errors are gRPC status
codes: INVALID_ARGUMENT (invalid, or dead-lettered: the message names the stage and reason),
NOT_FOUND, RESOURCE_EXHAUSTED, UNAVAILABLE, DEADLINE_EXCEEDED (the result did not come in
time; the message names the id, fetchable later at ``/v1/results/<id>``).
"""

from __future__ import annotations

import contextlib
import hmac
import logging
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, replace
from typing import Any, Final

import grpc

from ingest.grpc_v2 import grpc_predict_v2_pb2 as pb
from ingest.grpc_v2 import grpc_predict_v2_pb2_grpc as pb_grpc
from ingest.middleware import presented_key
from ingest.oip import (
    FROM_V2,
    GRPC_CODES,
    SERVICE_ERRORS,
    InferRequest,
    InferResponse,
    InputTensor,
    OipError,
    OipGateway,
    RequestedOutput,
    ServerMetadata,
    input_from_data,
    input_from_raw,
    model_metadata,
    model_ready,
    raw_bytes,
    service_error,
)

log = logging.getLogger(__name__)
_DEADLINE_MARGIN_S: Final = 0.05  # answer DEADLINE_EXCEEDED ourselves, with the id, before it
# Which typed-contents field holds each datatype (FP16 has none: raw contents only).
_CONTENTS: Final[Mapping[str, str]] = {
    "BOOL": "bool_contents",
    "UINT8": "uint_contents",
    "INT8": "int_contents",
    "INT16": "int_contents",
    "INT32": "int_contents",
    "INT64": "int64_contents",
    "FP32": "fp32_contents",
    "FP64": "fp64_contents",
}


@dataclass(frozen=True)
class GrpcConfig:
    """Where to listen and who may call: ``api_keys`` maps each key to its tenant (empty:
    every call is ``default_tenant``'s)."""

    host: str
    port: int  # 0: the OS chooses (the bound port is returned by :func:`serve_grpc`)
    default_tenant: str
    api_keys: Mapping[str, str]
    max_message_bytes: int  # the largest request accepted (the HTTP body limit)
    grace_s: float = 5.0  # calls in flight get this long to finish at shutdown


class InferenceServicer(pb_grpc.GRPCInferenceServiceServicer):
    """``GRPCInferenceService`` over an :class:`OipGateway`."""

    def __init__(self, gateway: OipGateway, config: GrpcConfig) -> None:
        self._gateway = gateway
        self._config = config
        self._keys = [(key.encode(), tenant) for key, tenant in config.api_keys.items()]

    async def ServerLive(  # noqa: N802 -- the protocol's method names
        self, request: pb.ServerLiveRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(  # noqa: N802
        self, request: pb.ServerReadyRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.ServerReadyResponse:
        return pb.ServerReadyResponse(ready=await self._gateway.server_ready())

    async def ServerMetadata(  # noqa: N802
        self, request: pb.ServerMetadataRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.ServerMetadataResponse:
        await self._tenant(context)
        meta = ServerMetadata()
        return pb.ServerMetadataResponse(
            name=meta.name, version=meta.version, extensions=list(meta.extensions)
        )

    async def ModelReady(  # noqa: N802
        self, request: pb.ModelReadyRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.ModelReadyResponse:
        await self._tenant(context)
        ready = model_ready(self._gateway.catalog, request.name, request.version or None)
        return pb.ModelReadyResponse(ready=ready)

    async def ModelMetadata(  # noqa: N802
        self, request: pb.ModelMetadataRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.ModelMetadataResponse:
        await self._tenant(context)
        try:
            meta = model_metadata(self._gateway.catalog, request.name, request.version or None)
        except OipError as exc:
            await _abort(context, exc)
        tensor = pb.ModelMetadataResponse.TensorMetadata
        return pb.ModelMetadataResponse(
            name=meta.name,
            versions=list(meta.versions),
            platform=meta.platform,
            inputs=[tensor(name=t.name, datatype=t.datatype, shape=t.shape) for t in meta.inputs],
            outputs=[tensor(name=t.name, datatype=t.datatype, shape=t.shape) for t in meta.outputs],
        )

    async def ModelInfer(  # noqa: N802
        self, request: pb.ModelInferRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.ModelInferResponse:
        tenant = await self._tenant(context)
        try:
            parsed = infer_request_from_proto(request)
            if parsed.timeout_s is None:
                parsed = replace(parsed, timeout_s=_deadline_s(context))
            answer = await self._gateway.infer(parsed, tenant=tenant)
        except OipError as exc:
            await _abort(context, exc)
        except SERVICE_ERRORS as exc:
            await _abort(context, service_error(exc))
        return infer_response_to_proto(answer)

    async def _tenant(self, context: grpc.aio.ServicerContext[Any, Any]) -> str:
        """The caller's tenant; aborts UNAUTHENTICATED / PERMISSION_DENIED like the HTTP
        API's 401 / 403."""
        if not self._keys:
            return self._config.default_tenant
        metadata = context.invocation_metadata() or ()
        headers = [(k.encode(), v.encode()) for k, v in metadata if isinstance(v, str)]
        presented = presented_key(headers)
        if presented is None:
            await context.abort(
                grpc.StatusCode.UNAUTHENTICATED,
                "an API key is required (metadata x-api-key or authorization: Bearer)",
            )
        found = None
        for key, tenant in self._keys:  # every key compared, as the HTTP guard does
            if hmac.compare_digest(presented, key):
                found = tenant
        if found is None:
            await context.abort(grpc.StatusCode.PERMISSION_DENIED, "the API key is not valid")
        return found


def _deadline_s(context: grpc.aio.ServicerContext[Any, Any]) -> float | None:
    remaining = context.time_remaining()
    if remaining is None:
        return None
    return max(remaining - _DEADLINE_MARGIN_S, 0.001)


async def _abort(context: grpc.aio.ServicerContext[Any, Any], exc: OipError) -> Any:
    code = getattr(grpc.StatusCode, GRPC_CODES.get(exc.status, "UNKNOWN"))
    details = exc.details
    message = exc.message
    if "id" in details and exc.status == 504:
        message = f"{message} (id {details['id']!r})"
    elif "reason" in details:
        message = f"{message} (reason {details['reason']})"
    await context.abort(code, message)


# ---------------------------------------------------------------- messages


def infer_request_from_proto(request: pb.ModelInferRequest) -> InferRequest:
    """The protocol-neutral request (raw contents, or typed contents per datatype)."""
    raw = list(request.raw_input_contents)
    if raw and len(raw) != len(request.inputs):
        raise OipError(400, f"{len(raw)} raw_input_contents for {len(request.inputs)} inputs")
    inputs = tuple(
        _input(tensor, raw[index] if raw else None) for index, tensor in enumerate(request.inputs)
    )
    params = request.parameters
    key = params["key"].string_param if "key" in params else None
    timeout = params["timeout"].int64_param if "timeout" in params else 0
    outputs = None
    if request.outputs:
        outputs = tuple(RequestedOutput(o.name) for o in request.outputs)
    return InferRequest(
        model=request.model_name,
        version=request.model_version or None,
        id=request.id or None,
        inputs=inputs,
        outputs=outputs,
        key=key or None,
        timeout_s=timeout / 1e6 if timeout > 0 else None,
    )


def _input(tensor: pb.ModelInferRequest.InferInputTensor, raw: bytes | None) -> InputTensor:
    shape = list(tensor.shape)
    if raw is not None:
        return input_from_raw(tensor.name, tensor.datatype, shape, raw)
    field = _CONTENTS.get(tensor.datatype)
    if field is None:
        if tensor.datatype in FROM_V2:  # FP16
            raise OipError(400, f"input {tensor.name!r}: {tensor.datatype} needs raw contents")
        return input_from_raw(tensor.name, tensor.datatype, shape, b"")  # names the datatype
    values = list(getattr(tensor.contents, field))
    return input_from_data(tensor.name, tensor.datatype, shape, values)


def infer_response_to_proto(answer: InferResponse) -> pb.ModelInferResponse:
    """Every output as raw contents (what tritonclient and the protocol's FP16 expect)."""
    output = pb.ModelInferResponse.InferOutputTensor
    return pb.ModelInferResponse(
        model_name=answer.model_name,
        model_version=answer.model_version,
        id=answer.id,
        outputs=[output(name=t.name, datatype=t.datatype, shape=t.shape) for t in answer.outputs],
        raw_output_contents=[raw_bytes(t.array) for t in answer.outputs],
    )


# ---------------------------------------------------------------- server

# The generated registration function carries no annotations (grpcio-tools writes none).
_add_servicer: Callable[[InferenceServicer, grpc.aio.Server], None] = (
    pb_grpc.add_GRPCInferenceServiceServicer_to_server
)


async def start_grpc(gateway: OipGateway, config: GrpcConfig) -> tuple[grpc.aio.Server, int]:
    """A started ``grpc.aio`` server on the running event loop, and its bound port."""
    limit = config.max_message_bytes
    server = grpc.aio.server(
        options=[("grpc.max_receive_message_length", limit)],
    )
    _add_servicer(InferenceServicer(gateway, config), server)
    port = server.add_insecure_port(f"{config.host}:{config.port}")
    await server.start()
    log.info("Open Inference Protocol gRPC on %s:%d", config.host, port)
    return server, port


@contextlib.asynccontextmanager
async def serving_grpc(gateway: OipGateway, config: GrpcConfig) -> AsyncIterator[int]:
    """The gRPC door for the duration of the block (yields the bound port); calls in flight
    at the end get ``config.grace_s`` to finish."""
    server, port = await start_grpc(gateway, config)
    try:
        yield port
    finally:
        await server.stop(config.grace_s)

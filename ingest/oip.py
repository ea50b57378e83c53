"""The Open Inference Protocol (KServe v2), without HTTP or gRPC: what both doors share.

A v2 inference request becomes :class:`RequestV1` records built by the same decoder as
``POST /v1/predict`` (so the same checks apply), produced to ``inference.requests`` and
awaited like a predict; the stored :class:`ResultV1` answers become v2 output tensors.
``ingest/oip_http.py`` and ``ingest/oip_grpc.py`` only translate their wire formats to and
from :class:`InferRequest` / :class:`InferResponse` and :class:`OipError`.

Shapes. A model declares each input's per-example shape (``[64]``); its v2 metadata shows a
variable batch dimension in front (``[-1, 64]``). A request tensor may be ``[N, 64]``: N rows,
each one record of its own (ids ``<id>/0`` ... ``<id>/<N-1>`` when N > 1, partition key shared
so that routing sends every row to the same version), answered together once every row has
its result, outputs stacked as ``[N, ...]``. A tensor without the batch dimension (``[64]``)
is one row. Outputs always carry the batch dimension.

Errors are :class:`OipError` with the HTTP status the protocol's HTTP binding uses; the gRPC
door maps the status to a gRPC code (:data:`GRPC_CODES`).
"""

from __future__ import annotations

import asyncio
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from importlib import metadata
from typing import Any, Final

import numpy as np
import numpy.typing as npt
from redis.exceptions import RedisError

from ingest.delivery import QueueFull
from ingest.payloads import BatchTooLarge, InvalidBody, RequestDecoder, RequestTooLarge, Submission
from ingest.service import IngestService, KafkaUnavailable, Overloaded
from ingest.tensors_json import TensorValueError, tensor_from_values
from ingest.waiters import DeadLettered, Outcome, ResultsUnavailable, Stored
from schemas import Codec, ResultV1, tensor_from_array, tensor_to_array
from schemas.models import ModelCatalog, ModelSpec, TensorSpec, UnknownModel, version_order

Array = npt.NDArray[Any]

SERVER_NAME: Final = "streaminfer"
PLATFORM: Final = "onnxruntime_onnx"
EXTENSIONS: Final = ("binary_tensor_data",)  # HTTP: the binary tensor data extension
# Our wire dtypes and their v2 names; v2 types missing here (UINT16..64, BYTES, BF16) have no
# wire form in the pipeline and are refused with a 400.
TO_V2: Final[Mapping[str, str]] = {
    "bool": "BOOL",
    "uint8": "UINT8",
    "int8": "INT8",
    "int16": "INT16",
    "int32": "INT32",
    "int64": "INT64",
    "float16": "FP16",
    "float32": "FP32",
    "float64": "FP64",
}
FROM_V2: Final[Mapping[str, str]] = {v2: ours for ours, v2 in TO_V2.items()}
GRPC_CODES: Final[Mapping[int, str]] = {  # HTTP status -> grpc.StatusCode member name
    400: "INVALID_ARGUMENT",
    401: "UNAUTHENTICATED",
    403: "PERMISSION_DENIED",
    404: "NOT_FOUND",
    413: "INVALID_ARGUMENT",
    429: "RESOURCE_EXHAUSTED",
    503: "UNAVAILABLE",
    504: "DEADLINE_EXCEEDED",
}
_RESULTS: Final = Codec(ResultV1)


class OipError(Exception):
    """A v2 error answer: ``{"error": message, **details}`` with HTTP ``status``."""

    def __init__(self, status: int, message: str, **details: Any) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.details = details

    def body(self) -> dict[str, Any]:
        return {"error": self.message, **self.details}


# What the service may raise for a request that is not at fault (or a batch over the limit).
SERVICE_ERRORS: Final = (
    QueueFull,
    Overloaded,
    BatchTooLarge,
    KafkaUnavailable,
    ResultsUnavailable,
    RedisError,
)


def service_error(exc: Exception) -> OipError:
    """``exc``, one of :data:`SERVICE_ERRORS`, as the v2 error both doors answer."""
    if isinstance(exc, QueueFull | Overloaded):
        return OipError(429, f"{exc}; retry later")
    if isinstance(exc, BatchTooLarge):
        return OipError(413, str(exc))
    if isinstance(exc, KafkaUnavailable):
        return OipError(503, str(exc))
    return OipError(503, f"Redis is unavailable: {exc!r}")


@dataclass(frozen=True, slots=True)
class InputTensor:
    """A request tensor as sent: its v2 datatype, shape and the elements as an array."""

    name: str
    datatype: str
    shape: tuple[int, ...]
    array: Array


@dataclass(frozen=True, slots=True)
class RequestedOutput:
    name: str
    binary: bool = False  # HTTP only: answer this output in the binary extension


@dataclass(frozen=True, slots=True)
class InferRequest:
    """A v2 inference request. ``outputs`` None: every output of the model. ``key``: the
    partition key (request parameter ``key``); ``timeout_s``: how long to wait, when the
    client said (request parameter ``timeout``, microseconds as in Triton, or the door's
    own way)."""

    model: str
    version: str | None
    id: str | None
    inputs: tuple[InputTensor, ...]
    outputs: tuple[RequestedOutput, ...] | None = None
    key: str | None = None
    timeout_s: float | None = None
    binary_output: bool = False  # HTTP: outputs not named in `outputs` answer in binary


@dataclass(frozen=True, slots=True)
class OutputTensor:
    name: str
    datatype: str
    shape: tuple[int, ...]
    array: Array
    binary: bool = False


@dataclass(frozen=True, slots=True)
class InferResponse:
    model_name: str
    model_version: str
    id: str
    outputs: tuple[OutputTensor, ...]


@dataclass(frozen=True, slots=True)
class TensorMetadata:
    name: str
    datatype: str
    shape: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class ModelMetadata:
    name: str
    versions: tuple[str, ...]
    platform: str
    inputs: tuple[TensorMetadata, ...]
    outputs: tuple[TensorMetadata, ...]


def _package_version() -> str:
    try:
        return metadata.version("streaminfer")
    except metadata.PackageNotFoundError:
        return "unknown"


@dataclass(frozen=True, slots=True)
class ServerMetadata:
    name: str = SERVER_NAME
    version: str = field(default_factory=_package_version)
    extensions: tuple[str, ...] = EXTENSIONS


# ---------------------------------------------------------------- models


def model_spec(catalog: ModelCatalog, name: str, version: str | None) -> ModelSpec:
    """The model's contract, 404 when the model or the version is unknown."""
    try:
        spec = catalog.spec(name)
        spec.resolve_version(version or None)
    except UnknownModel as exc:
        raise OipError(404, str(exc)) from None
    return spec


def model_metadata(catalog: ModelCatalog, name: str, version: str | None) -> ModelMetadata:
    """The v2 metadata of a model (from its ``model.yaml``); 404 when unknown."""
    spec = model_spec(catalog, name, version)
    return ModelMetadata(
        name=spec.name,
        versions=tuple(sorted(spec.versions, key=version_order)),
        platform=PLATFORM,
        inputs=tuple(_tensor_metadata(t) for t in spec.inputs),
        outputs=tuple(_tensor_metadata(t) for t in spec.outputs),
    )


def model_ready(catalog: ModelCatalog, name: str, version: str | None) -> bool:
    """Whether requests for the model (and version) are accepted: both are in the catalog."""
    try:
        model_spec(catalog, name, version)
    except OipError:
        return False
    return True


def _tensor_metadata(spec: TensorSpec) -> TensorMetadata:
    return TensorMetadata(spec.name, TO_V2.get(spec.dtype, spec.dtype), (-1, *spec.shape))


# ---------------------------------------------------------------- tensors in


def input_from_data(name: str, datatype: str, shape: Sequence[int], data: object) -> InputTensor:
    """An input given as numbers (v2 JSON ``data``, flat or nested, or gRPC typed contents):
    the checks of :mod:`ingest.tensors_json` (numbers only, no truncation, ints that fit)."""
    dtype = _our_dtype(name, datatype)
    raw = {"dtype": dtype, "shape": list(shape), "values": data}
    try:
        tensor = tensor_from_values(raw, default_dtype=dtype)
    except TensorValueError as exc:
        where = "data" if exc.path == ".values" else exc.path.lstrip(".") or "data"
        raise OipError(400, f"input {name!r}: {where}: {exc.message}") from None
    return InputTensor(name, datatype, tuple(shape), tensor_to_array(tensor))


def input_from_raw(name: str, datatype: str, shape: Sequence[int], raw: bytes) -> InputTensor:
    """An input given as raw bytes (the binary extension, gRPC ``raw_input_contents``):
    row-major, little-endian, exactly ``shape`` elements of ``datatype``."""
    dtype = np.dtype(_our_dtype(name, datatype)).newbyteorder("<")
    if any(d < 0 for d in shape):
        raise OipError(400, f"input {name!r}: shape {list(shape)} has a negative dimension")
    expected = math.prod(shape) * dtype.itemsize
    if len(raw) != expected:
        raise OipError(
            400,
            f"input {name!r}: {len(raw)} bytes of data, but shape {list(shape)} of "
            f"{datatype} needs {expected}",
        )
    return InputTensor(name, datatype, tuple(shape), np.frombuffer(raw, dtype).reshape(shape))


def _our_dtype(name: str, datatype: str) -> str:
    try:
        return FROM_V2[datatype]
    except KeyError:
        known = ", ".join(TO_V2.values())
        raise OipError(
            400, f"input {name!r}: datatype {datatype!r} is not supported (use one of {known})"
        ) from None


# ---------------------------------------------------------------- rows


def split_rows(
    spec: ModelSpec, inputs: Sequence[InputTensor], max_rows: int
) -> list[dict[str, Array]]:
    """One ``{input name: per-example array}`` per row, after checking that the request
    gives every input of the model once, with its datatype, and one row count for all."""
    by_name = {t.name: t for t in inputs}
    if len(by_name) != len(inputs):
        raise OipError(400, "an input is given twice")
    expected = {s.name for s in spec.inputs}
    if set(by_name) != expected:
        raise OipError(
            400,
            f"model {spec.name!r} takes inputs {sorted(expected)}, got {sorted(by_name)}",
        )
    counts = {s.name: _row_count(s, by_name[s.name]) for s in spec.inputs}
    if len(set(counts.values())) != 1:
        raise OipError(400, f"the inputs disagree on the batch size: {counts}")
    rows = next(iter(counts.values()))
    if rows is None:  # no batch dimension: the tensors are one example each
        return [{name: by_name[name].array for name in counts}]
    if not 0 < rows <= max_rows:
        raise OipError(400, f"the batch size must be 1 to {max_rows}, got {rows}")
    return [{name: by_name[name].array[i] for name in counts} for i in range(rows)]


def _row_count(spec: TensorSpec, tensor: InputTensor) -> int | None:
    """N for a ``[N, *example]`` tensor, None for an ``example``-shaped one."""
    wanted = TO_V2.get(spec.dtype, spec.dtype)
    if tensor.datatype != wanted:
        raise OipError(
            400, f"input {tensor.name!r} is {wanted}, the request gives {tensor.datatype}"
        )
    shape = tensor.shape
    if _fits(shape, spec.shape):
        return None
    if shape and _fits(shape[1:], spec.shape):
        return shape[0]
    example = list(spec.shape)
    raise OipError(
        400,
        f"input {tensor.name!r} has shape {list(shape)}; the model takes "
        f"{[-1, *example]} (or {example} for one example)",
    )


def _fits(shape: Sequence[int], declared: Sequence[int]) -> bool:
    return len(shape) == len(declared) and all(
        d in (s, -1) for s, d in zip(shape, declared, strict=True)
    )


# ---------------------------------------------------------------- the gateway


@dataclass(frozen=True, slots=True)
class OipLimits:
    default_timeout_s: float  # how long an infer waits when the client does not say
    max_timeout_s: float  # the longest a client may ask for
    max_rows: int  # rows per request (further bounded by the model's max_batch_size)


class OipGateway:
    """Runs v2 inference requests through the pipeline with the ingest service."""

    def __init__(self, *, service: IngestService, catalog: ModelCatalog, limits: OipLimits) -> None:
        self.service = service
        self.catalog = catalog
        self.limits = limits

    async def server_ready(self) -> bool:
        """Kafka and Redis answer (what ``/readyz`` checks)."""
        checks = await self.service.readiness()
        return all(state == "ok" for state in checks.values())

    def timeout(self, asked_s: float | None) -> float:
        if asked_s is None or asked_s <= 0:
            return self.limits.default_timeout_s
        return min(asked_s, self.limits.max_timeout_s)

    async def infer(self, request: InferRequest, *, tenant: str) -> InferResponse:
        """Produce one record per row as ``tenant``'s, wait for every result; the v2 answer.
        :class:`OipError` 400 (invalid or dead-lettered), 404 (unknown model), 413, 504."""
        spec = model_spec(self.catalog, request.model, request.version)
        wanted = _requested_outputs(spec, request.outputs, request.binary_output)
        rows = split_rows(spec, request.inputs, min(self.limits.max_rows, spec.max_batch_size))
        base_id = request.id or os.urandom(16).hex()
        submissions = build_submissions(self.service.decoder, request, base_id, rows)
        timeout_s = self.timeout(request.timeout_s)
        outcomes = await self._predict_all(submissions, tenant=tenant, timeout_s=timeout_s)
        results = collect_results(base_id, submissions, outcomes, timeout_s)
        return response_from_results(request.model, base_id, results, wanted)

    async def _predict_all(
        self, submissions: list[Submission], *, tenant: str, timeout_s: float
    ) -> list[Outcome | None]:
        answers = await asyncio.gather(
            *(self.service.predict(s, tenant=tenant, timeout_s=timeout_s) for s in submissions),
            return_exceptions=True,
        )
        for answer in answers:  # Kafka or Redis trouble: the door maps it (429/503)
            if isinstance(answer, BaseException):
                raise answer
        return [a for a in answers if not isinstance(a, BaseException)]


def build_submissions(
    decoder: RequestDecoder, request: InferRequest, base_id: str, rows: list[dict[str, Array]]
) -> list[Submission]:
    """The records of a request, one per row, built and checked by the ingest ``decoder``
    (exactly what ``/v1/predict`` does to its body). Row ids: ``base_id`` for one row,
    ``<base_id>/<row>`` for several."""
    # Rows of one request share a partition key: same partition, same routed version.
    key = request.key or (base_id if len(rows) > 1 else None)
    built = []
    for index, row in enumerate(rows):
        fields: dict[str, Any] = {
            "id": base_id if len(rows) == 1 else f"{base_id}/{index}",
            "model": request.model,
            "model_version": request.version or None,
            "inputs": {name: _wire(array) for name, array in row.items()},
            "key": key,
        }
        built.append(_decode(decoder, fields, index if len(rows) > 1 else None))
    return built


def _decode(decoder: RequestDecoder, fields: dict[str, Any], row: int | None) -> Submission:
    try:
        return decoder.decode_one(fields, path="$")
    except RequestTooLarge as exc:
        raise OipError(413, _field_messages(exc, row)) from None
    except InvalidBody as exc:
        raise OipError(400, _field_messages(exc, row)) from None


def _wire(array: Array) -> dict[str, Any]:
    tensor = tensor_from_array(array)
    return {"dtype": tensor.dtype, "shape": tensor.shape, "data": tensor.data}


def _field_messages(exc: InvalidBody, row: int | None) -> str:
    where = "" if row is None else f"row {row}: "
    return "; ".join(f"{where}{e.path}: {e.message}" for e in exc.errors)


def _requested_outputs(
    spec: ModelSpec, outputs: tuple[RequestedOutput, ...] | None, binary: bool
) -> tuple[RequestedOutput, ...]:
    if outputs is None:
        return tuple(RequestedOutput(o.name, binary) for o in spec.outputs)
    unknown = sorted({o.name for o in outputs} - {o.name for o in spec.outputs})
    if unknown:
        known = [o.name for o in spec.outputs]
        raise OipError(400, f"model {spec.name!r} has no output {unknown} (outputs: {known})")
    return outputs


def collect_results(
    base_id: str,
    submissions: list[Submission],
    outcomes: list[Outcome | None],
    timeout_s: float,
) -> list[ResultV1]:
    """Every row's result, or the first dead letter (400) or missing result (504)."""
    for submission, outcome in zip(submissions, outcomes, strict=True):
        if isinstance(outcome, DeadLettered):
            raise OipError(
                400,
                f"the {outcome.stage} stage dead-lettered request {submission.request.id!r}: "
                f"{outcome.message}",
                id=submission.request.id,
                reason=outcome.reason,
                stage=outcome.stage,
            )
    missing = [s.request.id for s, o in zip(submissions, outcomes, strict=True) if o is None]
    if missing:
        raise OipError(
            504,
            f"no result within {timeout_s}s for {len(missing)} of {len(submissions)} row(s); "
            f"each stays fetchable at /v1/results/<id>",
            id=base_id,
            ids=missing,
        )
    return [_RESULTS.decode(o.value) for o in outcomes if isinstance(o, Stored)]


def response_from_results(
    model: str, request_id: str, results: Sequence[ResultV1], outputs: Sequence[RequestedOutput]
) -> InferResponse:
    """The v2 answer: each requested output stacked over the rows (``[N, ...]``)."""
    versions = sorted({r.model_version for r in results})
    tensors = []
    for wanted in outputs:
        array = np.stack([tensor_to_array(r.outputs[wanted.name]) for r in results])
        datatype = TO_V2.get(array.dtype.name, array.dtype.name.upper())
        tensors.append(OutputTensor(wanted.name, datatype, array.shape, array, wanted.binary))
    # Rows share a partition key, so one version answers them all unless a swap fell between
    # their batches; then every version that answered is named.
    return InferResponse(model, ",".join(versions), request_id, tuple(tensors))


def raw_bytes(array: Array) -> bytes:
    """Row-major little-endian bytes of ``array`` (binary extension, gRPC raw contents)."""
    return np.ascontiguousarray(array.astype(array.dtype.newbyteorder("<"), copy=False)).tobytes()

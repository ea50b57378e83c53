"""Request validation: the one definition of a valid request.

The validate stage, the HTTP ingest (before producing) and the backfill CLI all ask the same
question -- may this :class:`RequestV1` enter the pipeline? -- and get the same answer:

- :func:`validate_request` -> :class:`Validated` (model version resolved) or :class:`Invalid`
  with a DLQ reason, a human detail and the field path (``$.model``, ``$.inputs.input``,
  ``$.created_at`` ...). It never raises for anything a client can send.
- :func:`numerically_clean` is the vectorised form of the input check for a whole batch (a
  handful of numpy calls per batch); rows it cannot vouch for get the exact check.
- :func:`request_size_limit`: the largest request that leaves room for what the stages add,
  so that anything accepted at the door can flow to the end of the pipeline.

Reasons (the ``dlq.reason`` codes): ``malformed`` (not a request, wrong types, buffer size
does not match shape, times not finite or absurd), ``unknown_model`` (model or version),
``signature_mismatch`` (input names, dtype or shape), ``non_finite`` (NaN/inf inputs),
``out_of_range`` (outside the declared bounds), ``expired`` (``deadline`` passed).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Final, Literal

import numpy as np

from schemas.codec import Codec, DecodeError
from schemas.messages import RequestV1, Tensor, ValidatedRequestV1
from schemas.models import ModelCatalog, ModelSpec, TensorSpec, UnknownModel
from schemas.tensors import TensorError, tensor_to_array

Reason = Literal[
    "malformed", "unknown_model", "signature_mismatch", "non_finite", "out_of_range", "expired"
]

TIME_WINDOW_S: Final = 365 * 24 * 3600.0
"""``created_at`` must be within this of now, and ``deadline`` at most this far ahead: a
clock in milliseconds, nanoseconds or 1970 is a client bug, and a time that is not a finite
number would poison every latency metric computed from it."""

DLQ_ERROR_MAX_CHARS: Final = 4000
"""The most characters of explanation a dead letter's ``dlq.error`` header holds (the DLQ
writer truncates to it); in UTF-8 that is at most four times as many bytes."""

# What the pipeline adds to a request on its way (see request_size_limit). Generous on purpose:
# being a few KB short of message_max_bytes costs nothing; being 25 bytes over stops a stage.
_VALIDATED_GROWTH: Final = 512  # validated_at, the resolved model_version, map header growth
_RECORD_HEADERS: Final = 1024  # content-type, schema, traceparent, tenant; record framing
_DLQ_HEADERS: Final = 4 * DLQ_ERROR_MAX_CHARS + 1024  # dlq.* headers; a topic name is <= 249
PIPELINE_MARGIN_BYTES: Final = _VALIDATED_GROWTH + _RECORD_HEADERS + _DLQ_HEADERS

_REQUESTS: Final = Codec(RequestV1)


@dataclass(frozen=True, slots=True)
class Invalid:
    """Why a request may not enter the pipeline: ``reason`` (the DLQ reason code), ``detail``
    (for humans) and ``path``, the field at fault (``$`` for the whole request)."""

    reason: Reason
    detail: str
    path: str = "$"

    def path_under(self, prefix: str) -> str:
        """The path with its root ``$`` replaced by ``prefix`` (e.g. ``$[3]`` in a batch)."""
        return prefix + self.path[1:]


@dataclass(slots=True)
class Validated:
    """A request that passed: its model's contract and the version it resolves to. Read-only
    by convention (copy with ``dataclasses.replace``): not frozen because one is built per
    request, and a frozen dataclass takes about twice as long to build."""

    request: RequestV1
    spec: ModelSpec
    version: str
    timings: Mapping[str, float] | None = None  # parse processors' seconds (stages.plugins)

    def message(self, *, validated_at: float) -> ValidatedRequestV1:
        """The validated request. Its ``model_version`` is the one the request named, or
        None: a request that names no version is routed by the infer stage at batch time
        (``version`` is then the default version, for callers that need one now)."""
        request = self.request
        return ValidatedRequestV1(
            id=request.id,
            model=request.model,
            model_version=request.model_version,
            inputs=request.inputs,
            created_at=request.created_at,
            validated_at=validated_at,
            deadline=request.deadline,
            attributes=request.attributes,
            timings=dict(self.timings or {}),
        )


def decode_request(value: bytes) -> RequestV1 | Invalid:
    """The :class:`RequestV1` encoded in ``value`` (MessagePack), or why it is not one."""
    try:
        return _REQUESTS.decode(value)
    except DecodeError as exc:
        return Invalid("malformed", f"not a valid inference.request/1: {exc}")
    except RecursionError:  # msgspec raises it (not DecodeError) for very deep nesting
        return Invalid("malformed", "not a valid inference.request/1: nested too deeply")


def validate_request(
    request: RequestV1, catalog: ModelCatalog, *, now: float
) -> Validated | Invalid:
    """Everything the validate stage checks, exactly, for one request. The inputs of a model
    with parse processors are the processors' to read (e.g. features by name): the validate
    stage checks the tensors they build, so they are not checked here."""
    checked = check_envelope(request, catalog, now=now)
    if isinstance(checked, Invalid):
        return checked
    if checked.spec.processors.parses_inputs:
        return checked
    return check_inputs(checked.spec, request.inputs) or checked


def check_envelope(request: RequestV1, catalog: ModelCatalog, *, now: float) -> Validated | Invalid:
    """Everything but the input tensors: times, model, version, deadline."""
    problem = check_times(request.created_at, request.deadline, now=now)
    if problem is not None:
        return problem
    try:
        spec = catalog.spec(request.model)
    except UnknownModel as exc:
        return Invalid("unknown_model", str(exc), "$.model")
    try:
        version = spec.resolve_version(request.model_version)
    except UnknownModel as exc:
        return Invalid("unknown_model", str(exc), "$.model_version")
    if request.deadline is not None and request.deadline < now:
        late = now - request.deadline
        return Invalid("expired", f"deadline passed {late:.3f}s before validation", "$.deadline")
    return Validated(request, spec, version)


def check_times(created_at: float, deadline: float | None, *, now: float) -> Invalid | None:
    """``created_at`` finite and within :data:`TIME_WINDOW_S` of ``now``; ``deadline`` (when
    given) finite and at most that far ahead. A deadline in the past is for the caller to
    call expired."""
    if not math.isfinite(created_at):
        return Invalid(
            "malformed", f"created_at must be finite, got {created_at!r}", "$.created_at"
        )
    if abs(created_at - now) > TIME_WINDOW_S:
        return Invalid(
            "malformed",
            f"created_at {created_at!r} is more than a year from now ({now:.0f}); "
            "times are Unix epoch seconds",
            "$.created_at",
        )
    if deadline is None:
        return None
    if not math.isfinite(deadline):
        return Invalid("malformed", f"deadline must be finite, got {deadline!r}", "$.deadline")
    if deadline - now > TIME_WINDOW_S:
        return Invalid(
            "malformed",
            f"deadline {deadline!r} is more than a year ahead ({now:.0f}); "
            "times are Unix epoch seconds",
            "$.deadline",
        )
    return None


def check_inputs(spec: ModelSpec, inputs: dict[str, Tensor]) -> Invalid | None:
    """Why ``inputs`` do not match the model's input signature, or None when they do."""
    expected = {i.name for i in spec.inputs}
    missing = sorted(expected - inputs.keys())
    unexpected = sorted(inputs.keys() - expected)
    if missing or unexpected:
        return Invalid(
            "signature_mismatch",
            f"model {spec.name!r} takes inputs {sorted(expected)}; "
            f"missing {missing}, unexpected {unexpected}",
            "$.inputs",
        )
    for input_spec in spec.inputs:
        problem = _check_tensor(input_spec, inputs[input_spec.name])
        if problem is not None:
            return problem
    return None


def _check_tensor(spec: TensorSpec, tensor: Tensor) -> Invalid | None:
    where = f"input {spec.name!r}"
    path = f"$.inputs.{spec.name}"
    if tensor.dtype != spec.dtype:
        detail = f"{where} must be {spec.dtype}, got {tensor.dtype}"
        return Invalid("signature_mismatch", detail, path)
    if tuple(tensor.shape) != spec.shape:
        detail = f"{where} must have shape {list(spec.shape)}, got {list(tensor.shape)}"
        return Invalid("signature_mismatch", detail, path)
    try:
        array = tensor_to_array(tensor)
    except TensorError as exc:
        return Invalid("malformed", f"{where}: {exc}", path)
    if array.dtype.kind == "f" and not np.isfinite(array).all():
        return Invalid("non_finite", f"{where} contains NaN or infinity", path)
    if spec.min is not None and array.size and float(array.min()) < spec.min:
        detail = f"{where} has {float(array.min())} below the minimum {spec.min}"
        return Invalid("out_of_range", detail, path)
    if spec.max is not None and array.size and float(array.max()) > spec.max:
        detail = f"{where} has {float(array.max())} above the maximum {spec.max}"
        return Invalid("out_of_range", detail, path)
    return None


def numerically_clean(rows: Sequence[tuple[ModelSpec, dict[str, Tensor]]]) -> list[bool]:
    """Per row, True when its inputs surely pass :func:`check_inputs`: names, dtype, shape and
    buffer size match, values finite and within bounds. Checked per (model, input) over the
    whole batch at once (one ``np.frombuffer`` of the joined buffers): a handful of numpy
    calls per batch instead of per record. False only means "check this row exactly"."""
    names: dict[int, frozenset[str]] = {}  # per contract in the batch: its input names
    clean: list[bool] = []
    for spec, inputs in rows:
        expected = names.get(id(spec))
        if expected is None:
            expected = names[id(spec)] = frozenset(i.name for i in spec.inputs)
        clean.append(inputs.keys() == expected)
    by_input: dict[tuple[str, str], tuple[TensorSpec, list[int]]] = {}
    for index, (spec, _inputs) in enumerate(rows):
        if clean[index]:
            for input_spec in spec.inputs:
                key = (spec.name, input_spec.name)
                entry = by_input.get(key)
                if entry is None:
                    entry = by_input[key] = (input_spec, [])
                entry[1].append(index)
    for (_model, name), (input_spec, indexes) in by_input.items():
        tensors = [rows[i][1][name] for i in indexes]
        for index, ok in zip(indexes, _tensors_clean(input_spec, tensors), strict=True):
            clean[index] = clean[index] and ok
    return clean


def _tensors_clean(spec: TensorSpec, tensors: list[Tensor]) -> list[bool]:
    dtype = np.dtype(spec.dtype).newbyteorder("<")
    size = math.prod(spec.shape) * dtype.itemsize
    shape = list(spec.shape)
    fits = [t.dtype == spec.dtype and t.shape == shape and len(t.data) == size for t in tensors]
    if size == 0 or not any(fits):
        return fits
    joined = b"".join(t.data for t, ok in zip(tensors, fits, strict=True) if ok)
    values = np.frombuffer(joined, dtype=dtype).reshape(sum(fits), -1)
    good = np.ones(len(values), dtype=bool)
    if dtype.kind == "f":
        good &= np.isfinite(values).all(axis=1)
    if spec.min is not None:
        good &= values.min(axis=1) >= spec.min
    if spec.max is not None:
        good &= values.max(axis=1) <= spec.max
    verdicts = iter(good.tolist())
    return [ok and next(verdicts) for ok in fits]


def request_size_limit(message_max_bytes: int) -> int:
    """The most bytes a request's encoded value plus its key may take at the door.

    Every record derived from an accepted request must fit ``message_max_bytes`` (librdkafka's
    ``message.max.bytes``, which counts key, value and headers): the validated request (the
    request plus ``validated_at`` and the resolved version, with fresh headers) and a dead
    letter of it (its value untouched plus the ``dlq.*`` headers, ``dlq.error`` up to
    :data:`DLQ_ERROR_MAX_CHARS`). :data:`PIPELINE_MARGIN_BYTES` covers both.
    """
    return message_max_bytes - PIPELINE_MARGIN_BYTES

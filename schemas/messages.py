"""Versioned message Structs.

Every record on a pipeline topic carries one of these as its MessagePack value and names it in
the ``schema`` header (``<name>/<version>``, see :data:`SCHEMA_NAMES`). Structs are frozen and
slotted; msgspec validates types while decoding, so a Struct in hand is well-typed.

Times are Unix epoch seconds as floats (``time.time()``): portable across languages and
precise to the microsecond. Unknown fields are ignored on decode so that a newer producer
adding an optional field does not break an older stage.
"""

from __future__ import annotations

from typing import Annotated, Final, Literal

import msgspec
from msgspec import Meta, Struct

from schemas.control import ModelState

NonEmptyId = Annotated[str, Meta(min_length=1, max_length=256)]
ModelName = Annotated[str, Meta(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9_.\-]+$")]
DType = Literal["float32", "float64", "float16", "int8", "int16", "int32", "int64", "uint8", "bool"]
Dim = Annotated[int, Meta(ge=0)]


class Tensor(Struct, frozen=True, forbid_unknown_fields=True):
    """An n-dimensional array: ``data`` is the C-order little-endian buffer of ``shape``
    elements of ``dtype``. Decoding builds a numpy view with ``np.frombuffer`` (no copy)."""

    dtype: DType
    shape: list[Dim]
    data: bytes


class RequestV1(Struct, frozen=True, kw_only=True):
    """An inference request, as clients write it to ``inference.requests``.

    ``id`` is the client's idempotency key (the same id twice yields one stored result).
    ``inputs`` maps each model input name to one example (batch dimension excluded).
    ``deadline`` (optional, epoch seconds): after it the request is dead-lettered as expired.
    """

    id: NonEmptyId
    model: ModelName
    inputs: dict[str, Tensor]
    created_at: float
    model_version: str | None = None
    deadline: float | None = None
    attributes: dict[str, str] = msgspec.field(default_factory=dict)


class ValidatedRequestV1(Struct, frozen=True, kw_only=True):
    """A request that passed validation: its inputs match the model's signature.

    ``model_version`` is the version the request named, or ``None`` when it named none: the
    infer stage then routes it at batch time (the control plane's weighted split, sticky per
    record key), so a routing change applies to requests already validated.
    ``timings`` carries what validate measured (e.g. a parse processor's seconds) on to the
    result's ``timings``.
    """

    id: NonEmptyId
    model: ModelName
    inputs: dict[str, Tensor]
    created_at: float
    validated_at: float
    model_version: str | None = None
    deadline: float | None = None
    attributes: dict[str, str] = msgspec.field(default_factory=dict)
    timings: dict[str, float] = msgspec.field(default_factory=dict)


class ResultV1(Struct, frozen=True, kw_only=True):
    """A model's answer to one request.

    ``outputs`` holds every model output for this example. When the model declares labels,
    ``label`` is the predicted one and ``scores`` maps each label to its score.
    ``timings`` holds per-stage timestamps (epoch seconds): ``validated``, ``inferred``.
    """

    id: NonEmptyId
    model: ModelName
    model_version: str
    status: Literal["ok"]
    outputs: dict[str, Tensor]
    created_at: float
    label: str | None = None
    scores: dict[str, float] | None = None
    timings: dict[str, float] = msgspec.field(default_factory=dict)
    attributes: dict[str, str] = msgspec.field(default_factory=dict)


class StoredV1(Struct, frozen=True, kw_only=True):
    """Notice that a result is stored in Redis under ``key`` (written by persist)."""

    id: NonEmptyId
    model: ModelName
    model_version: str
    key: str
    created_at: float
    stored_at: float
    label: str | None = None


SCHEMA_NAMES: Final[dict[type[Struct], str]] = {
    RequestV1: "inference.request/1",
    ValidatedRequestV1: "inference.validated/1",
    ResultV1: "inference.result/1",
    StoredV1: "inference.stored/1",
    ModelState: "inference.model-state/1",
}

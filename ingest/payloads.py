"""HTTP bodies (and JSON lines) -> ``RequestV1`` records ready for Kafka.

One definition of valid: every request is built with ``msgspec.convert`` into the same
:class:`RequestV1` Struct the pipeline decodes, encoded to MessagePack, and (unless disabled)
run through :meth:`ValidateStage.validate`, exactly what the validate stage will do to it. So a
client hears about a wrong field, an unknown model or a signature mismatch at once, and
nothing invalid reaches Kafka. A batch is all or nothing: one bad request rejects the body.

Besides the :class:`RequestV1` fields, a request object may carry ``key`` (partition key,
default the id). ``id`` defaults to a generated one and ``created_at`` to the time received.
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Final

import msgspec

from ingest.tensors_json import DEFAULT_DTYPE, TensorValueError, is_values_form, tensor_from_values
from schemas import Codec, RequestV1, Tensor
from stages.errors import InvalidRecord
from stages.models import ModelRegistry, UnknownModel
from stages.validate import ValidateStage

JSON_TYPES: Final = frozenset({"application/json"})
MSGPACK_TYPES: Final = frozenset(
    {"application/msgpack", "application/x-msgpack", "application/vnd.msgpack"}
)
_INPUT_NAME = re.compile(r"input '([^']*)'")


@dataclass(frozen=True, slots=True)
class Submission:
    """A valid request: the Struct, its MessagePack bytes and its partition key."""

    request: RequestV1
    value: bytes
    partition_key: str


@dataclass(frozen=True, slots=True)
class FieldError:
    """What is wrong where: ``path`` like ``$[3].inputs.input.dtype``; ``reason`` is a DLQ
    reason code (``malformed``, ``unknown_model``, ``signature_mismatch`` ...)."""

    path: str
    reason: str
    message: str


class InvalidBody(Exception):
    """The body (or one request in it) is invalid; nothing of it may be produced."""

    def __init__(self, errors: list[FieldError]) -> None:
        super().__init__("; ".join(f"{e.path}: {e.message}" for e in errors))
        self.errors = errors


class BatchTooLarge(Exception):
    """More requests in one body than allowed."""


class UnsupportedMediaType(Exception):
    """A content type other than JSON or MessagePack."""


class RequestDecoder:
    """Decodes bodies into :class:`Submission` lists.

    ``registry`` (optional) gives default dtypes for list-form tensors and enables the model
    signature check; without it only the message schema is checked.
    """

    def __init__(
        self,
        *,
        registry: ModelRegistry | None,
        max_batch: int,
        clock: Callable[[], float] = time.time,
        new_id: Callable[[], str] = lambda: os.urandom(16).hex(),
    ) -> None:
        self._registry = registry
        self._validator = (
            ValidateStage(registry=registry, output_topic="", clock=clock) if registry else None
        )
        self._max_batch = max_batch
        self._clock = clock
        self._new_id = new_id
        self._codec = Codec(RequestV1)

    def decode_body(
        self, body: bytes, content_type: str | None, *, batch: bool = True
    ) -> list[Submission]:
        """Every request of the body; an object is one request, an array a batch."""
        parsed = parse(body, content_type)
        if isinstance(parsed, dict):
            return [self.decode_one(parsed, path="$")]
        if not batch:
            raise InvalidBody([FieldError("$", "malformed", "expected one request object")])
        if not isinstance(parsed, list):
            raise InvalidBody(
                [FieldError("$", "malformed", "expected a request object or an array of them")]
            )
        if len(parsed) > self._max_batch:
            raise BatchTooLarge(
                f"{len(parsed)} requests in one body; the limit is {self._max_batch}"
            )
        if not parsed:
            raise InvalidBody([FieldError("$", "malformed", "the batch is empty")])
        return self._decode_batch(parsed)

    def _decode_batch(self, items: list[Any]) -> list[Submission]:
        submissions, errors = [], []
        for index, item in enumerate(items):
            try:
                submissions.append(self.decode_one(item, path=f"$[{index}]"))
            except InvalidBody as exc:
                errors.extend(exc.errors)
        if errors:
            raise InvalidBody(errors)
        return submissions

    def decode_one(self, raw: object, *, path: str) -> Submission:
        """One request object (already parsed from JSON/MessagePack) at ``path``."""
        if not isinstance(raw, dict):
            raise InvalidBody([_malformed(path, f"expected an object, got {_kind(raw)}")])
        fields = dict(raw)
        key = fields.pop("key", None)
        if key is not None and not (isinstance(key, str) and 0 < len(key) <= 256):
            raise InvalidBody([_malformed(f"{path}.key", "key must be a string of 1-256 chars")])
        if fields.get("id") is None:
            fields["id"] = self._new_id()
        if fields.get("created_at") is None:
            fields["created_at"] = self._clock()
        fields["inputs"] = self._tensors(fields.get("inputs"), fields.get("model"), path)
        try:
            request = msgspec.convert(fields, RequestV1)
        except msgspec.ValidationError as exc:
            raise InvalidBody([_schema_error(path, str(exc))]) from None
        value = self._codec.encode(request)
        self._check(value, path)
        return Submission(request=request, value=value, partition_key=key or request.id)

    def _tensors(self, inputs: object, model: object, path: str) -> object:
        """Inputs with every tensor converted (list forms built); per-input error paths."""
        if not isinstance(inputs, dict):
            return inputs  # msgspec reports the type error with its path
        tensors: dict[str, Tensor] = {}
        for name, raw in inputs.items():
            where = f"{path}.inputs.{name}"
            try:
                if is_values_form(raw):
                    tensors[name] = tensor_from_values(raw, default_dtype=self._dtype(model, name))
                else:
                    tensors[name] = msgspec.convert(raw, Tensor)
            except TensorValueError as exc:
                raise InvalidBody([_malformed(where + exc.path, exc.message)]) from None
            except msgspec.ValidationError as exc:
                raise InvalidBody([_schema_error(where, str(exc))]) from None
        return tensors

    def _dtype(self, model: object, input_name: object) -> str:
        if self._registry is None or not isinstance(model, str):
            return DEFAULT_DTYPE
        try:
            spec = self._registry.spec(model)
        except UnknownModel:
            return DEFAULT_DTYPE
        return next((i.dtype for i in spec.inputs if i.name == input_name), DEFAULT_DTYPE)

    def _check(self, value: bytes, path: str) -> None:
        if self._validator is None:
            return
        try:
            self._validator.validate(value, now=self._clock())
        except InvalidRecord as exc:
            raise InvalidBody([_pipeline_error(path, exc)]) from None


def parse(body: bytes, content_type: str | None) -> Any:
    """The body as Python objects; JSON unless the content type says MessagePack."""
    media = (content_type or "application/json").split(";", 1)[0].strip().lower()
    try:
        if media in JSON_TYPES or media.endswith("+json"):
            return msgspec.json.decode(body)
        if media in MSGPACK_TYPES:
            return msgspec.msgpack.decode(body)
    except msgspec.DecodeError as exc:
        kind = "JSON" if "json" in media else "MessagePack"
        raise InvalidBody([_malformed("$", f"not valid {kind}: {exc}")]) from None
    raise UnsupportedMediaType(
        f"content type {media!r} is not supported; use application/json or application/msgpack"
    )


def _schema_error(prefix: str, text: str) -> FieldError:
    """msgspec's ``<reason> - at `$.a.b``` with ``$`` replaced by ``prefix``."""
    message, sep, where = text.rpartition(" - at `")
    if not sep:
        return _malformed(prefix, text)
    return _malformed(prefix + where.rstrip("`")[1:], message)


def _pipeline_error(prefix: str, exc: InvalidRecord) -> FieldError:
    field = _REASON_FIELDS.get(exc.reason, ".inputs")
    if field == ".inputs" and (match := _INPUT_NAME.search(exc.detail)):
        field = f".inputs.{match.group(1)}"
    return FieldError(prefix + field, exc.reason, exc.detail)


_REASON_FIELDS: Final[Mapping[str, str]] = {"unknown_model": ".model", "expired": ".deadline"}


def _malformed(path: str, message: str) -> FieldError:
    return FieldError(path, "malformed", message)


def _kind(value: object) -> str:
    return {list: "an array", str: "a string", bool: "a boolean", type(None): "null"}.get(
        type(value), type(value).__name__
    )

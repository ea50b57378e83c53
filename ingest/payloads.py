"""HTTP bodies (and JSON lines) -> ``RequestV1`` records ready for Kafka.

One definition of valid: every request is built with ``msgspec.convert`` into the same
:class:`RequestV1` Struct the pipeline decodes and (unless disabled) checked with
:func:`schemas.validation.validate_request`, exactly what the validate stage will do to it. So
a client hears about a wrong field, an unknown model or a signature mismatch at once (with the
field's path), and nothing invalid reaches Kafka. A batch is all or nothing: one bad request
rejects the body, and nothing of it is produced.

Client bytes never cause a server error: bodies nested too deeply, numbers out of range,
shapes whose size overflows and requests too large for the pipeline are all refused with the
path of the field at fault. The work done on a body is bounded before its requests are
counted: a batch body is first split into its raw items (no Python objects built for them),
counted, and only then decoded item by item.

Besides the :class:`RequestV1` fields, a request object may carry ``key`` (partition key,
default the id). ``id`` defaults to a generated one and ``created_at`` to the time received.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final

import msgspec

from ingest.tensors_json import DEFAULT_DTYPE, TensorValueError, is_values_form, tensor_from_values
from schemas import Codec, RequestV1, Tensor
from schemas.keys import reserved_attributes
from schemas.models import ModelCatalog, UnknownModel
from schemas.validation import (
    PIPELINE_MARGIN_BYTES,
    Invalid,
    check_times,
    request_size_limit,
    validate_request,
)

JSON_TYPES: Final = frozenset({"application/json"})
MSGPACK_TYPES: Final = frozenset(
    {"application/msgpack", "application/x-msgpack", "application/vnd.msgpack"}
)
TOO_LARGE: Final = "too_large"

# A body is one request (an object, decoded whole) or a batch: an array split into raw items,
# so that counting them costs one scan and no Python object per item.
Body = dict[str, Any] | list[msgspec.Raw]
_BODY_DECODERS: Final = {
    "JSON": msgspec.json.Decoder(Body),
    "MessagePack": msgspec.msgpack.Decoder(Body),
}
_ITEM_DECODERS: Final = {"JSON": msgspec.json.Decoder(), "MessagePack": msgspec.msgpack.Decoder()}


@dataclass(frozen=True, slots=True)
class Submission:
    """A valid request: the Struct, its MessagePack bytes and its partition key."""

    request: RequestV1
    value: bytes
    partition_key: str


@dataclass(frozen=True, slots=True)
class FieldError:
    """What is wrong where: ``path`` like ``$[3].inputs.input.dtype``; ``reason`` is a DLQ
    reason code (``malformed``, ``unknown_model``, ``signature_mismatch`` ...) or
    ``too_large``."""

    path: str
    reason: str
    message: str


class InvalidBody(Exception):
    """The body (or one request in it) is invalid; nothing of it may be produced."""

    def __init__(self, errors: list[FieldError]) -> None:
        super().__init__("; ".join(f"{e.path}: {e.message}" for e in errors))
        self.errors = errors


class RequestTooLarge(InvalidBody):
    """Every error is a request too large for the pipeline (HTTP 413 rather than 422)."""


class BatchTooLarge(Exception):
    """More requests in one body than allowed."""


class UnsupportedMediaType(Exception):
    """A content type other than JSON or MessagePack."""


class RequestDecoder:
    """Decodes bodies into :class:`Submission` lists.

    ``catalog`` (optional) gives default dtypes for list-form tensors and enables the model
    signature check; without it only the message schema and the times are checked.
    ``message_max_bytes`` is the producers' record limit: a request is accepted only when
    every record the pipeline derives from it fits (see
    :func:`schemas.validation.request_size_limit`).
    """

    def __init__(
        self,
        *,
        catalog: ModelCatalog | None,
        max_batch: int,
        message_max_bytes: int,
        clock: Callable[[], float] = time.time,
        new_id: Callable[[], str] = lambda: os.urandom(16).hex(),
    ) -> None:
        self._catalog = catalog
        self._max_batch = max_batch
        self._message_max_bytes = message_max_bytes
        self._max_bytes = request_size_limit(message_max_bytes)
        self._clock = clock
        self._new_id = new_id
        self._codec = Codec(RequestV1)

    def decode_body(
        self, body: bytes, content_type: str | None, *, batch: bool = True
    ) -> list[Submission]:
        """Every request of the body; an object is one request, an array a batch."""
        kind = _kind_of(content_type)
        if kind == "MessagePack":  # its header says how many items: check before reading any
            self._check_count(_msgpack_array_length(body))
        parsed = _decode(_BODY_DECODERS[kind], body, kind)
        if isinstance(parsed, dict):
            return [self.decode_one(parsed, path="$")]
        if not batch:
            raise InvalidBody([_malformed("$", "expected one request object")])
        self._check_count(len(parsed))
        if not parsed:
            raise InvalidBody([_malformed("$", "the batch is empty")])
        return self._decode_batch(parsed, kind)

    def _check_count(self, count: int | None) -> None:
        if count is not None and count > self._max_batch:
            raise BatchTooLarge(f"{count} requests in one body; the limit is {self._max_batch}")

    def _decode_batch(self, items: list[msgspec.Raw], kind: str) -> list[Submission]:
        submissions, errors = [], []
        for index, item in enumerate(items):
            path = f"$[{index}]"
            try:
                raw = _decode(_ITEM_DECODERS[kind], item, kind, path=path)
                submissions.append(self.decode_one(raw, path=path))
            except InvalidBody as exc:
                errors.extend(exc.errors)
        if errors:
            raise _invalid(errors)
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
        if reserved := reserved_attributes(request.attributes):  # only the pipeline writes them
            message = "reserved for the pipeline's own use; choose another attribute name"
            raise InvalidBody([_malformed(f"{path}.attributes.{n}", message) for n in reserved])
        problem = self._check(request)
        if problem is not None:
            error = FieldError(problem.path_under(path), problem.reason, problem.detail)
            raise InvalidBody([error])
        partition_key = key or request.id
        value = self._encode(request, partition_key, path)
        return Submission(request=request, value=value, partition_key=partition_key)

    def _check(self, request: RequestV1) -> Invalid | None:
        now = self._clock()
        if self._catalog is None:
            return check_times(request.created_at, request.deadline, now=now)
        checked = validate_request(request, self._catalog, now=now)
        return checked if isinstance(checked, Invalid) else None

    def _encode(self, request: RequestV1, partition_key: str, path: str) -> bytes:
        """The record's value, refused unless every record derived from it fits Kafka."""
        try:
            value = self._codec.encode(request)
        except OverflowError as exc:  # only without a catalog: e.g. a shape dimension > 2**64
            raise InvalidBody([_malformed(path, f"cannot be encoded: {exc}")]) from None
        size = len(value) + len(partition_key.encode())
        if size > self._max_bytes:
            message = (
                f"the request takes {size} bytes as a record (value and key); the limit is "
                f"{self._max_bytes} (Kafka's {self._message_max_bytes} less "
                f"{PIPELINE_MARGIN_BYTES} for what the pipeline adds)"
            )
            raise RequestTooLarge([FieldError(path, TOO_LARGE, message)])
        return value

    def _tensors(self, inputs: object, model: object, path: str) -> object:
        """Inputs with every tensor converted (list forms built); per-input error paths."""
        if not isinstance(inputs, dict):
            return inputs  # msgspec reports the type error with its path
        tensors: dict[str, Tensor] = {}
        for name, raw in inputs.items():
            if not isinstance(name, str):
                raise InvalidBody([_malformed(f"{path}.inputs", "input names must be strings")])
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

    def _dtype(self, model: object, input_name: str) -> str:
        if self._catalog is None or not isinstance(model, str):
            return DEFAULT_DTYPE
        try:
            spec = self._catalog.spec(model)
        except UnknownModel:
            return DEFAULT_DTYPE
        return next((i.dtype for i in spec.inputs if i.name == input_name), DEFAULT_DTYPE)


def parse(body: bytes, content_type: str | None) -> Body:
    """The body as a request object, or an array of raw (not yet decoded) items; JSON unless
    the content type says MessagePack. :class:`InvalidBody` when it is neither."""
    kind = _kind_of(content_type)
    parsed: Body = _decode(_BODY_DECODERS[kind], body, kind)
    return parsed


def _msgpack_array_length(body: bytes) -> int | None:
    """The item count in a MessagePack array's header; None when ``body`` is no array."""
    if not body:
        return None
    first = body[0]
    if 0x90 <= first <= 0x9F:  # fixarray
        return first & 0x0F
    width = {0xDC: 2, 0xDD: 4}.get(first)  # array 16, array 32 (big-endian counts)
    if width is None or len(body) < 1 + width:
        return None
    return int.from_bytes(body[1 : 1 + width], "big")


def _kind_of(content_type: str | None) -> str:
    media = (content_type or "application/json").split(";", 1)[0].strip().lower()
    if media in JSON_TYPES or media.endswith("+json"):
        return "JSON"
    if media in MSGPACK_TYPES:
        return "MessagePack"
    raise UnsupportedMediaType(
        f"content type {media!r} is not supported; use application/json or application/msgpack"
    )


def _decode(decoder: Any, data: bytes | msgspec.Raw, kind: str, *, path: str = "$") -> Any:
    """``decoder.decode(data)``, every failure a :class:`InvalidBody` at ``path``."""
    try:
        return decoder.decode(data)
    except msgspec.ValidationError as exc:  # not an object or array; a number out of range
        raise InvalidBody([_schema_error(path, str(exc))]) from None
    except msgspec.DecodeError as exc:
        raise InvalidBody([_malformed(path, f"not valid {kind}: {exc}")]) from None
    except RecursionError:  # msgspec's answer to nesting deeper than the interpreter allows
        raise InvalidBody([_malformed(path, f"not valid {kind}: nested too deeply")]) from None


def _invalid(errors: list[FieldError]) -> InvalidBody:
    """413 only when size is all that is wrong; any other error makes it a 422."""
    if all(e.reason == TOO_LARGE for e in errors):
        return RequestTooLarge(errors)
    return InvalidBody(errors)


def _schema_error(prefix: str, text: str) -> FieldError:
    """msgspec's ``<reason> - at `$.a.b``` with ``$`` replaced by ``prefix``."""
    message, sep, where = text.rpartition(" - at `")
    if not sep:
        return _malformed(prefix, text)
    where = where.rstrip("`")
    if "..." in where or not where.startswith("$"):  # inside an untyped value, or a map key
        return _malformed(prefix, text)
    return _malformed(prefix + where[1:], message)


def _malformed(path: str, message: str) -> FieldError:
    return FieldError(path, "malformed", message)


def _kind(value: object) -> str:
    return {list: "an array", str: "a string", bool: "a boolean", type(None): "null"}.get(
        type(value), type(value).__name__
    )

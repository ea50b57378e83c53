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

import math
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final, NamedTuple, cast, get_args

import msgspec
import numpy as np
import numpy.typing as npt

from ingest.tensors_json import DEFAULT_DTYPE, TensorValueError, is_values_form, tensor_from_values
from schemas import Codec, RequestV1, Tensor
from schemas.keys import reserved_attributes
from schemas.messages import DType
from schemas.models import ModelCatalog, ModelSpec, TensorSpec, UnknownModel
from schemas.validation import (
    PIPELINE_MARGIN_BYTES,
    Invalid,
    Validated,
    check_envelope,
    check_inputs,
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


def _envelope_struct() -> type[msgspec.Struct]:
    """:class:`RequestV1` without ``inputs``: the same fields, types, constraints, defaults
    and options, so converting to it fails exactly as converting to ``RequestV1`` would for
    a request whose inputs are valid tensors (an unknown field is ignored by both)."""
    config = RequestV1.__struct_config__
    fields: list[tuple[str, Any] | tuple[str, Any, Any]] = []
    for info in msgspec.structs.fields(RequestV1):
        if info.name == "inputs":
            continue
        if info.default_factory is not msgspec.NODEFAULT:
            fields.append(
                (info.name, info.type, msgspec.field(default_factory=info.default_factory))
            )
        elif info.default is not msgspec.NODEFAULT:
            fields.append((info.name, info.type, info.default))
        else:
            fields.append((info.name, info.type))
    return msgspec.defstruct(
        "RequestEnvelope",
        fields,
        kw_only=True,  # only keyword construction here; it frees the field order
        frozen=config.frozen,
        array_like=config.array_like,
        forbid_unknown_fields=config.forbid_unknown_fields,
        tag=config.tag,
        tag_field=config.tag_field,
        rename={i.name: i.encode_name for i in msgspec.structs.fields(RequestV1)},
    )


_ENVELOPE: Final = _envelope_struct()


class RandomIds:
    """Request ids: 32 hex digits of ``os.urandom`` (unguessable: an id is how a client
    reads its result back), drawn 4 KiB at a time rather than one system call per id. A
    forked child (a uvicorn worker) throws away what its parent drew."""

    __slots__ = ("_buffer", "_forks", "_offset")

    _CHUNK: Final = 4096

    def __init__(self) -> None:
        self._buffer = b""
        self._offset = 0
        self._forks = _forks[0]

    def __call__(self) -> str:
        offset = self._offset
        if offset + 16 > len(self._buffer) or self._forks != _forks[0]:
            self._buffer, offset, self._forks = os.urandom(self._CHUNK), 0, _forks[0]
        self._offset = offset + 16
        return self._buffer[offset : offset + 16].hex()


_forks = [0]  # forks this process descends from: a child must not reuse its parent's draws


def _forked() -> None:
    _forks[0] += 1


os.register_at_fork(after_in_child=_forked)


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
        new_id: Callable[[], str] | None = None,
    ) -> None:
        self._catalog = catalog
        self._max_batch = max_batch
        self._message_max_bytes = message_max_bytes
        self._max_bytes = request_size_limit(message_max_bytes)
        self._clock = clock
        self._new_id = new_id or RandomIds()
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
            return self._decode_items([parsed], ["$"])
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
        raws: list[object] = []
        paths: list[str] = []
        errors: list[FieldError] = []
        decoder = _ITEM_DECODERS[kind]
        for index, item in enumerate(items):
            path = f"$[{index}]"
            try:
                raws.append(_decode(decoder, item, kind, path=path))
                paths.append(path)
            except InvalidBody as exc:
                errors.extend(exc.errors)
        if errors:  # the body is refused whole: the other items' errors are reported too
            errors.extend(self._item_errors(raws, paths))
            raise _invalid(sorted(errors, key=lambda e: _item_index(e.path)))
        return self._decode_items(raws, paths)

    def _item_errors(self, raws: list[object], paths: list[str]) -> list[FieldError]:
        try:
            self._decode_items(raws, paths)
        except InvalidBody as exc:
            return exc.errors
        return []

    def _decode_items(self, raws: list[object], paths: list[str]) -> list[Submission]:
        """:meth:`decode_one` of every item, with the same outcome item by item, in fewer
        steps: the list-form tensors of the items that share a model and input names are
        built with one numpy conversion per input, and their values checked with one
        :func:`schemas.validation.numerically_clean` call (see :class:`_Vectorised`).
        Items that do not fit that shape (or whose values could convert differently one by
        one) take :meth:`decode_one` itself."""
        vectorised = _Vectorised.build(self, raws)
        done: list[Submission | None] = [None] * len(raws)
        errors: list[FieldError] = []
        waiting: list[tuple[int, RequestV1, str, ModelSpec]] = []  # inputs still to check
        for index, (raw, path) in enumerate(zip(raws, paths, strict=True)):
            tensors = vectorised.tensors.get(index)
            try:
                if tensors is None:
                    done[index] = self.decode_one(raw, path=path)
                    continue
                request, partition_key, spec = self._envelope(
                    cast(dict[str, Any], raw), tensors, path
                )
                if spec is None:
                    done[index] = self._submission(request, partition_key, path)
                else:
                    waiting.append((index, request, partition_key, spec))
            except InvalidBody as exc:
                errors.extend(exc.errors)
        for index, request, partition_key, spec in waiting:
            path = paths[index]
            try:
                problem = None if index in vectorised.clean else check_inputs(spec, request.inputs)
                if problem is not None:
                    error = FieldError(problem.path_under(path), problem.reason, problem.detail)
                    raise InvalidBody([error])
                done[index] = self._submission(request, partition_key, path)
            except InvalidBody as exc:
                errors.extend(exc.errors)
        if errors:
            raise _invalid(sorted(errors, key=lambda e: _item_index(e.path)))
        return cast(list[Submission], done)

    def _envelope(
        self, raw: dict[str, Any], tensors: dict[str, Tensor], path: str
    ) -> tuple[RequestV1, str, ModelSpec | None]:
        """:meth:`decode_one` up to the input check, for an item whose tensors are built:
        the request, its partition key, and the model whose input check is still to do
        (None: nothing left to check)."""
        fields = dict(raw)
        key = fields.pop("key", None)  # _Vectorised.build took only valid keys
        if fields.get("id") is None:
            fields["id"] = self._new_id()
        if fields.get("created_at") is None:
            fields["created_at"] = self._clock()
        del fields["inputs"]  # built already: converting them again costs more than the rest
        try:
            envelope = msgspec.convert(fields, _ENVELOPE)
        except msgspec.ValidationError as exc:
            raise InvalidBody([_schema_error(path, str(exc))]) from None
        request = RequestV1(inputs=tensors, **msgspec.structs.asdict(envelope))
        self._refuse_reserved(request, path)
        now = self._clock()
        if self._catalog is None:
            problem = check_times(request.created_at, request.deadline, now=now)
            checked: Validated | Invalid | None = problem
        else:
            checked = check_envelope(request, self._catalog, now=now)
        if isinstance(checked, Invalid):
            error = FieldError(checked.path_under(path), checked.reason, checked.detail)
            raise InvalidBody([error])
        partition_key = key or request.id
        if checked is None or checked.spec.processors.parses_inputs:
            return request, partition_key, None
        return request, partition_key, checked.spec

    def _convert(self, fields: dict[str, Any], path: str) -> RequestV1:
        """The request Struct of ``fields``; refused for schema errors and reserved
        attributes."""
        try:
            request = msgspec.convert(fields, RequestV1)
        except msgspec.ValidationError as exc:
            raise InvalidBody([_schema_error(path, str(exc))]) from None
        self._refuse_reserved(request, path)
        return request

    @staticmethod
    def _refuse_reserved(request: RequestV1, path: str) -> None:
        attributes = request.attributes
        if attributes and (reserved := reserved_attributes(attributes)):  # the pipeline's own
            message = "reserved for the pipeline's own use; choose another attribute name"
            raise InvalidBody([_malformed(f"{path}.attributes.{n}", message) for n in reserved])

    def _submission(self, request: RequestV1, partition_key: str, path: str) -> Submission:
        value = self._encode(request, partition_key, path)
        return Submission(request=request, value=value, partition_key=partition_key)

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
        request = self._convert(fields, path)
        problem = self._check(request)
        if problem is not None:
            error = FieldError(problem.path_under(path), problem.reason, problem.detail)
            raise InvalidBody([error])
        return self._submission(request, key or request.id, path)

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

    def _spec(self, model: str) -> ModelSpec | None:
        if self._catalog is None:
            return None
        try:
            return self._catalog.spec(model)
        except UnknownModel:
            return None

    def _dtype(self, model: object, input_name: str) -> str:
        if self._catalog is None or not isinstance(model, str):
            return DEFAULT_DTYPE
        try:
            spec = self._catalog.spec(model)
        except UnknownModel:
            return DEFAULT_DTYPE
        return next((i.dtype for i in spec.inputs if i.name == input_name), DEFAULT_DTYPE)


class _Vectorised:
    """The list-form tensors of a body's items, built one input at a time for all items
    that share a model and input names: one ``np.asarray`` of their value lists and one
    ``astype``, instead of both per item; and per item whether its inputs surely pass
    :func:`schemas.validation.check_inputs` (names, dtype and shape as the model declares,
    values finite and within bounds, from each row's minimum and maximum).

    Only where the outcome is the one item by item (``tensor_from_values``) for sure: every
    input a bare number list, the model's dtype for it a float, the joined values a regular
    array of booleans, integers or floats, all within 2**53 in magnitude (there an integer
    converts to the same float whether numpy saw it among floats or alone; NaN and infinity
    fail this test too). Any other item is left to :meth:`decode_one`; an item not surely
    clean gets the exact check.
    """

    __slots__ = ("clean", "tensors")

    def __init__(self) -> None:
        self.tensors: dict[int, dict[str, Tensor]] = {}  # item index -> its built inputs
        self.clean: set[int] = set()  # item indexes whose inputs surely pass check_inputs

    @classmethod
    def build(cls, decoder: RequestDecoder, raws: list[object]) -> _Vectorised:
        built = cls()
        if sys.byteorder != "little":  # the wire is little-endian; numpy's native may not be
            return built
        groups: dict[tuple[str, tuple[str, ...]], list[int]] = {}
        for index, raw in enumerate(raws):
            shape = _plain_shape(raw)
            if shape is not None:
                groups.setdefault(shape, []).append(index)
        for (model, names), indexes in groups.items():
            built._add_group(
                decoder, model, names, [cast(dict[str, Any], raws[i]) for i in indexes], indexes
            )
        return built

    def _add_group(
        self,
        decoder: RequestDecoder,
        model: str,
        names: tuple[str, ...],
        raws: list[dict[str, Any]],
        indexes: list[int],
    ) -> None:
        spec = decoder._spec(model)
        by_name = {i.name: i for i in spec.inputs} if spec is not None else {}
        if spec is None or spec.processors.parses_inputs or set(names) != set(by_name):
            by_name = {}  # nothing to vouch for: the exact check decides
        columns: list[_Column] = []
        for name in names:
            column = _Column.build(
                [raw["inputs"][name] for raw in raws],
                decoder._dtype(model, name),
                by_name.get(name),
            )
            if column is None:
                return
            columns.append(column)
        for row, index in enumerate(indexes):
            self.tensors[index] = {
                name: c.tensors[row] for name, c in zip(names, columns, strict=True)
            }
            if by_name and all(c.clean[row] for c in columns):
                self.clean.add(index)


def _plain_shape(raw: object) -> tuple[str, tuple[str, ...]] | None:
    """(model, input names) of a request object whose inputs are all bare lists and whose
    key (if any) is valid; None for any other item."""
    if type(raw) is not dict:
        return None
    key = raw.get("key")
    if key is not None and not (type(key) is str and 0 < len(key) <= 256):
        return None
    model, inputs = raw.get("model"), raw.get("inputs")
    if type(model) is not str or type(inputs) is not dict or not inputs:
        return None
    for name, value in inputs.items():
        if type(name) is not str or type(value) is not list:
            return None
    return model, tuple(inputs)


_EXACT_FLOAT_INTS: Final = 2.0**53


class _Column(NamedTuple):
    """One input of a group of items: each item's wire tensor, and whether it surely
    passes the input check against ``spec`` (all False without one)."""

    tensors: list[Tensor]
    clean: list[bool]

    @classmethod
    def build(cls, lists: list[list[Any]], dtype: str, spec: TensorSpec | None) -> _Column | None:
        """None when the lists cannot be built together (see :class:`_Vectorised`)."""
        target = _FLOAT_DTYPES.get(dtype)
        if target is None:
            return None
        name = cast(DType, dtype)  # a float DType: numpy's own name of `target`
        if len(lists) == 1:
            return cls._one(lists[0], target, name, spec)
        try:
            joint = np.asarray(lists)
        except Exception:  # ragged, too deep, huge integers: decode_one says what is wrong
            return None
        if joint.ndim < 2 or joint.dtype.kind not in "bif":
            return None
        count = len(lists)
        rows = joint.reshape(count, -1)
        low = high = None
        if rows.shape[1]:
            low, high = np.minimum.reduce(rows, axis=1), np.maximum.reduce(rows, axis=1)
            if joint.dtype.kind == "f" and not (
                np.minimum.reduce(low) >= -_EXACT_FLOAT_INTS
                and np.maximum.reduce(high) <= _EXACT_FLOAT_INTS
            ):
                return None
        converted = joint.astype(target)
        shape = list(converted.shape[1:])
        data = converted.tobytes()
        step = len(data) // count
        tensors = [
            Tensor(dtype=name, shape=list(shape), data=data[row * step : (row + 1) * step])
            for row in range(count)
        ]
        clean = [False] * count
        if spec is not None and low is not None and high is not None:
            clean = _within(spec, name, shape, low.astype(target), high.astype(target))
        return cls(tensors, clean)

    @classmethod
    def _one(
        cls, values: list[Any], target: np.dtype[Any], name: DType, spec: TensorSpec | None
    ) -> _Column | None:
        """One item: numpy infers its values' type as ``tensor_from_values`` does (nothing
        joined, so no precision question), and the check takes scalar minimum and maximum."""
        try:
            array = np.asarray(values)
        except Exception:
            return None
        if array.dtype.kind not in "biuf":
            return None
        converted = array.astype(target)
        tensor = Tensor(dtype=name, shape=list(converted.shape), data=converted.tobytes())
        clean = False
        if (
            spec is not None
            and converted.size
            and name == spec.dtype
            and converted.shape == spec.shape
        ):
            low = float(np.minimum.reduce(converted, axis=None))
            high = float(np.maximum.reduce(converted, axis=None))
            clean = (
                math.isfinite(low)
                and math.isfinite(high)
                and (spec.min is None or low >= spec.min)
                and (spec.max is None or high <= spec.max)
            )
        return cls([tensor], [clean])


def _within(
    spec: TensorSpec, dtype: str, shape: list[int], low: npt.NDArray[Any], high: npt.NDArray[Any]
) -> list[bool]:
    """Per row: dtype and shape as ``spec`` declares, minimum and maximum (in the tensor's
    dtype; rounding keeps the order) finite and within its bounds. Compared as float64, as
    ``float(array.min())`` in the exact check."""
    if dtype != spec.dtype or tuple(shape) != spec.shape:
        return [False] * len(low)
    low64, high64 = low.astype(np.float64), high.astype(np.float64)
    good = np.isfinite(low64) & np.isfinite(high64)
    if spec.min is not None:
        good &= low64 >= spec.min
    if spec.max is not None:
        good &= high64 <= spec.max
    return cast(list[bool], good.tolist())


# The float dtypes of the wire, by name (numpy's own name: a tensor built with one is
# named the same by ``tensor_from_array``).
_FLOAT_DTYPES: Final = {
    name: np.dtype(name)
    for name in get_args(DType)
    if np.dtype(name).kind == "f" and np.dtype(name).name == name
}


def _item_index(path: str) -> int:
    """The batch index in an error path (``$[3].inputs`` -> 3; ``$...`` -> 0)."""
    if path.startswith("$["):
        return int(path[2 : path.index("]")])
    return 0


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

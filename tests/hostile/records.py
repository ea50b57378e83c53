"""Hostile records: bytes nobody encoded with our code, for every stage's input topic.

Each :class:`Hostile` is what a careless or malicious Kafka producer (kcat, Go, Java...) can
write: random bytes, truncated or mutated MessagePack of the topic's message type, header
names and values that are not UTF-8, nesting a thousand levels deep, extreme shapes and
dtypes, NaN and infinite times, and values within a few bytes of the producer's maximum.
Everything is built from raw dicts and hand-written MessagePack, never from the Structs'
encoders, so nothing here is limited to what our own code can produce. Deterministic for a
given seed.
"""

from __future__ import annotations

import math
import random
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final, Literal

import msgspec
import numpy as np

MessageType = Literal["request", "validated", "result"]
Header = tuple[str | bytes, bytes]

_ENCODE: Final = msgspec.msgpack.encode


@dataclass(frozen=True, slots=True)
class Hostile:
    """One record to write: ``kind`` names what is wrong with it (for the report)."""

    kind: str
    key: bytes | None
    value: bytes | None
    headers: list[Header] | None = None


def _tensor(dtype: str, shape: list[Any], data: bytes) -> dict[str, Any]:
    return {"dtype": dtype, "shape": shape, "data": data}


def _pixels(rng: random.Random) -> dict[str, Any]:
    values = np.asarray([rng.randint(0, 16) for _ in range(64)], dtype="<f4")
    return _tensor("float32", [64], values.tobytes())


def base(message: MessageType, record_id: str, rng: random.Random) -> dict[str, Any]:
    """A well-formed message of ``message`` type as a raw dict (the digits model)."""
    now = time.time()
    if message == "result":
        probabilities = np.full(10, 0.1, dtype="<f4").tobytes()
        return {
            "id": record_id,
            "model": "digits",
            "model_version": "1",
            "status": "ok",
            "outputs": {
                "label": _tensor("int64", [], struct.pack("<q", 3)),
                "probabilities": _tensor("float32", [10], probabilities),
            },
            "created_at": now,
            "label": "3",
            "scores": {str(i): 0.1 for i in range(10)},
            "timings": {"validated": now, "inferred": now},
            "attributes": {},
        }
    fields: dict[str, Any] = {
        "id": record_id,
        "model": "digits",
        "inputs": {"input": _pixels(rng)},
        "created_at": now,
        "attributes": {},
    }
    if message == "validated":
        fields |= {"model_version": "1", "validated_at": now}
    return fields


def _deep(depth: int) -> bytes:
    """MessagePack of ``depth`` nested one-element arrays around nil (hand-written: an
    encoder would refuse)."""
    return b"\x91" * depth + b"\xc0"


def _map(entries: list[tuple[str, bytes]]) -> bytes:
    """A MessagePack map of already-encoded values."""
    out = bytearray(b"\xde" + struct.pack(">H", len(entries)))
    for name, encoded in entries:
        out += _ENCODE(name) + encoded
    return bytes(out)


def _with(fields: dict[str, Any], **changes: Any) -> bytes:
    return _ENCODE({**fields, **changes})


def _with_tensor(fields: dict[str, Any], message: MessageType, tensor: dict[str, Any]) -> bytes:
    slot = "outputs" if message == "result" else "inputs"
    name = "probabilities" if message == "result" else "input"
    return _ENCODE({**fields, slot: {**fields[slot], name: tensor}})


def _mutated(value: bytes, rng: random.Random) -> bytes:
    data = bytearray(value)
    for _ in range(rng.randint(1, 6)):
        position = rng.randrange(len(data))
        choice = rng.random()
        if choice < 0.6:
            data[position] = rng.randrange(256)
        elif choice < 0.8:
            data.insert(position, rng.randrange(256))
        else:
            del data[position]
    return bytes(data)


Builder = Callable[[dict[str, Any], MessageType, random.Random], "bytes | None"]


def _value_builders() -> dict[str, Builder]:
    """Kind -> how to build its value from a well-formed message's fields."""
    nan, inf = math.nan, math.inf
    return {
        "random_bytes": lambda f, m, r: r.randbytes(r.randint(1, 400)),
        "empty_value": lambda f, m, r: b"",
        "null_value": lambda f, m, r: None,
        "msgpack_nil": lambda f, m, r: b"\xc0",
        "msgpack_list": lambda f, m, r: _ENCODE([f["id"], "digits"]),
        "truncated": lambda f, m, r: (v := _ENCODE(f))[: r.randint(1, len(v) - 1)],
        "mutated": lambda f, m, r: _mutated(_ENCODE(f), r),
        "wrong_types": lambda f, m, r: _with(f, id=12, created_at="yesterday", attributes=[1]),
        "attributes_not_strings": lambda f, m, r: _with(f, attributes={"a": 5, "b": [1]}),
        "forged_reserved_attributes": lambda f, m, r: _with(
            f, attributes={"backfill_id": "bf-x", "file": "/etc/passwd", "row": "\u00b2"}
        ),
        "long_id": lambda f, m, r: _with(f, id="i" * 5000),
        "bad_model_name": lambda f, m, r: _with(f, model="../../etc/passwd\x00"),
        "deep_unknown_field": lambda f, m, r: _map(
            [(k, _ENCODE(v)) for k, v in f.items()] + [("extra", _deep(1500))]
        ),
        "deep_tensor": lambda f, m, r: _map(
            [(k, _ENCODE(v)) for k, v in f.items() if k not in ("inputs", "outputs")]
            + [("outputs" if m == "result" else "inputs", _deep(3000))]
        ),
        "deep_attributes": lambda f, m, r: _map(
            [(k, _ENCODE(v)) for k, v in f.items() if k != "attributes"]
            + [("attributes", b"\x81\xa1a" + _deep(2000))]
        ),
        "nan_created_at": lambda f, m, r: _with(f, created_at=nan),
        "inf_created_at": lambda f, m, r: _with(f, created_at=r.choice([inf, -inf])),
        "huge_created_at": lambda f, m, r: _with(f, created_at=1e308),
        "nan_deadline": lambda f, m, r: _with(f, deadline=nan),
        "inf_deadline": lambda f, m, r: _with(f, deadline=r.choice([inf, -inf])),
        "shape_overflow": lambda f, m, r: _with_tensor(
            f, m, _tensor("float32", [0, 4611686018427387904], b"")
        ),
        "shape_uint64": lambda f, m, r: _with_tensor(f, m, _tensor("float32", [2**64 - 1], b"")),
        "shape_negative": lambda f, m, r: _with_tensor(f, m, _tensor("float32", [-64], b"")),
        "shape_100_dims": lambda f, m, r: _with_tensor(
            f, m, _tensor("float32", [1] * 100, b"\x00" * 4)
        ),
        "shape_not_ints": lambda f, m, r: _with_tensor(f, m, _tensor("float32", [8.5, "8"], b"")),
        "bad_dtype": lambda f, m, r: _with_tensor(
            f, m, _tensor(r.choice(["complex128", "object", "<f4", ""]), [64], b"\x00" * 256)
        ),
        "dtype_mismatch": lambda f, m, r: _with_tensor(f, m, _tensor("int8", [64], b"\x01" * 64)),
        "data_too_short": lambda f, m, r: _with_tensor(f, m, _tensor("float32", [64], b"\x00")),
        "non_finite_data": lambda f, m, r: _with_tensor(
            f, m, _tensor("float32", [64], np.full(64, np.nan, dtype="<f4").tobytes())
        ),
        "bool_garbage": lambda f, m, r: _with_tensor(f, m, _tensor("bool", [64], b"\x07" * 64)),
    }


_HEADER_KINDS: Final[dict[str, list[Header]]] = {
    "header_name_not_utf8": [(b"\xff\xfe\xfd", b"x"), (b"\xc3\x28", b"y")],
    "header_value_not_utf8": [("content-type", b"\xc3\x28"), ("schema", b"\x80\x81\xfe")],
    "header_garbage_traceparent": [("traceparent", b"\xff" * 55)],
    "header_dlq_forged": [
        ("dlq.source.topic", b"\xff"),
        ("dlq.source.offset", b"\xb2"),
        ("dlq.reason", b"x" * 10_000),
    ],
    "header_tenant_garbage": [("streaminfer.tenant", b"a:b\xff/\x00")],
    "header_repeated": [("schema", b"inference.result/1")] * 50,
}


def near_limit(
    message: MessageType, record_id: str, rng: random.Random, *, limit: int, slack: int
) -> bytes:
    """A well-formed message whose encoding is ``limit - slack`` bytes (one tensor padded):
    within the producer's maximum as written, over it once a stage adds a field or the
    ``dlq.*`` headers."""
    fields = base(message, record_id, rng)
    target = limit - slack
    padding = 0
    for _ in range(4):  # the length prefix of the padded bytes changes the total a little
        fields["attributes"] = {"pad": "p" * padding}
        padding += target - len(_ENCODE(fields))
    fields["attributes"] = {"pad": "p" * padding}
    value = _ENCODE(fields)
    assert len(value) == target, (len(value), target)
    return value


def generate(
    message: MessageType, count: int, rng: random.Random, *, limit: int, tag: str
) -> list[Hostile]:
    """``count`` hostile records for a topic carrying ``message``: every value kind and
    header kind at least once when ``count`` allows, then random ones; two near-limit."""
    builders = _value_builders()
    kinds = [*builders, *_HEADER_KINDS]
    chosen = kinds[:count] + [rng.choice(kinds) for _ in range(count - len(kinds))]
    records: list[Hostile] = []
    for index, kind in enumerate(chosen[: max(count - 2, 0)]):
        record_id = f"{tag}-{index}"
        fields = base(message, record_id, rng)
        key = None if rng.random() < 0.1 else rng.randbytes(rng.randint(1, 40))
        if kind in builders:
            records.append(Hostile(kind, key, builders[kind](fields, message, rng)))
        else:
            records.append(Hostile(kind, key, _ENCODE(fields), list(_HEADER_KINDS[kind])))
    for slack in (0, 25)[: min(count, 2)]:
        record_id = f"{tag}-near-{slack}"
        value = near_limit(message, record_id, rng, limit=limit, slack=slack)
        records.append(Hostile(f"near_limit_{slack}", record_id.encode(), value))
    return records

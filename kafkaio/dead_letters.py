"""Reading dead letters (and the id of any pipeline record) from whatever bytes arrive.

A dead letter is the original record (key and value untouched, its own headers kept) plus
the ``dlq.*`` headers the stage added: stage, reason, error and the source topic, partition
and offset. Anyone can write to the DLQ topic, so nothing here trusts a byte of it: header
names or values that are not UTF-8, headers that are missing, repeated or garbage, a value
that is not MessagePack or nests a thousand levels deep -- :func:`read_dead_letter` returns a
:class:`DeadLetter` for every record and never raises.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

import msgspec
from confluent_kafka import Message

from schemas import Headers

# What a malformed value can make msgspec raise (deep nesting is a RecursionError).
_UNDECODABLE: Final = (msgspec.DecodeError, RecursionError, ValueError, OverflowError)
_MAX_INT_DIGITS: Final = 19  # an offset or partition number fits in an int64


class RecordHead(msgspec.Struct, frozen=True):
    """The fields every pipeline message (request, validated request, result) shares; enough
    to tell whose a record is without decoding its tensors."""

    id: str
    attributes: dict[str, str] = msgspec.field(default_factory=dict)


class _IdOnly(msgspec.Struct, frozen=True):
    id: str


_HEAD: Final = msgspec.msgpack.Decoder(RecordHead)
_ID: Final = msgspec.msgpack.Decoder(_IdOnly)


def decode_head(value: bytes | None) -> RecordHead | None:
    """The record's id and attributes; None when it is not a pipeline message. Attributes
    that are not a string-to-string map are dropped (the id is still found)."""
    if not value:
        return None
    try:
        return _HEAD.decode(value)
    except _UNDECODABLE:
        pass
    try:
        return RecordHead(id=_ID.decode(value).id)
    except _UNDECODABLE:
        return None


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """One record of the DLQ topic. Text fields are ``""`` and numbers None when the header
    is missing or unreadable; ``reason`` is ``"unknown"`` then."""

    stage: str
    reason: str
    error: str
    source_topic: str
    source_partition: int | None
    source_offset: int | None
    key: bytes | None
    value: bytes  # the original value, or a prefix of it when ``truncated_from`` is set
    truncated_from: int | None  # the original value's length, when the DLQ had to cut it
    head: RecordHead | None  # of the original value, when it is a pipeline message
    tenant: str | None  # the original record's tenant header (None: the default tenant)
    headers: dict[str, bytes]  # every readable header, the record's own and the dlq.* ones

    @property
    def request_id(self) -> str | None:
        """The original request's id: from its value, else its key (None: neither)."""
        if self.head is not None:
            return self.head.id
        return self.key.decode(errors="replace") if self.key else None


def read_dead_letter(message: Message) -> DeadLetter:
    """Parse a consumed DLQ record; never raises (see the module docstring)."""
    headers = header_map(message)
    value = _bytes_or_empty(message.value)
    return DeadLetter(
        stage=_text(headers.get(Headers.DLQ_STAGE)),
        reason=_text(headers.get(Headers.DLQ_REASON)) or "unknown",
        error=_text(headers.get(Headers.DLQ_ERROR)),
        source_topic=_text(headers.get(Headers.DLQ_SOURCE_TOPIC)),
        source_partition=_number(headers.get(Headers.DLQ_SOURCE_PARTITION)),
        source_offset=_number(headers.get(Headers.DLQ_SOURCE_OFFSET)),
        key=_bytes_or_empty(message.key) or None,
        value=value,
        truncated_from=_number(headers.get(Headers.DLQ_TRUNCATED)),
        head=decode_head(value),
        tenant=_text(headers.get(Headers.TENANT)) or None,
        headers=headers,
    )


def header_map(message: Message) -> dict[str, bytes]:
    """Header name -> value of a consumed record; the last one wins when a name repeats (the
    stage appends its ``dlq.*`` headers after the record's own). Empty when the headers cannot
    be read at all: confluent-kafka raises on a header *name* that is not UTF-8."""
    try:
        raw = message.headers() or []
        pairs = list(raw.items() if isinstance(raw, dict) else raw)
    except Exception:  # any failure of the client's decoding: treat as no headers
        return {}
    found: dict[str, bytes] = {}
    for pair in pairs:
        if not isinstance(pair, tuple) or len(pair) != 2:
            continue
        name, value = pair
        if isinstance(name, bytes):
            name = name.decode(errors="replace")
        if isinstance(value, str):
            value = value.encode(errors="replace")
        if isinstance(name, str) and isinstance(value, bytes):
            found[name] = value
    return found


def _bytes_or_empty(read: Callable[[], bytes | None]) -> bytes:
    try:
        data = read()
    except Exception:  # a broken record must not break the reader
        return b""
    return data if isinstance(data, bytes) else b""


def _text(value: bytes | None) -> str:
    return value.decode(errors="replace") if value else ""


def _number(value: bytes | None) -> int | None:
    if not value or len(value) > _MAX_INT_DIGITS or not value.isdigit():
        return None
    return int(value)

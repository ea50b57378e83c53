"""Consumed Kafka messages as :class:`Record` s, and a batch's offsets (see :mod:`stages.runtime`).

Reading a message is part of the per-record isolation: a message that cannot be read as a
:class:`Record` (e.g. a header name that is not UTF-8) becomes a ``malformed`` rejection,
never an exception that stops the stage.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import cast

from confluent_kafka import Message, TopicPartition

from stages.pauses import Partition
from stages.records import Record, Rejection

Headers = tuple[tuple[str, bytes], ...]


def to_record(message: Message) -> Record:
    """The :class:`Record` of a consumed message. Raises for messages that cannot be read:
    confluent-kafka decodes header names as UTF-8 and raises when one is not.

    Per record, so cheap: the consumer's ``(name, bytes)`` header pairs are kept as they are
    (only a header without a value, None, is rebuilt as ``b""``)."""
    raw = message.headers()
    pairs = tuple(raw.items() if isinstance(raw, dict) else raw) if raw else ()
    for pair in pairs:
        if pair.__class__ is not tuple or pair[1].__class__ is not bytes:  # None: rebuild all
            headers = tuple((k, _header_bytes(v)) for k, v in pairs)
            return _record(message, headers, message.timestamp()[1])
    return Record(
        message.topic() or "",
        message.partition() or 0,
        message.offset() or 0,
        message.key(),
        message.value() or b"",
        cast(Headers, pairs),  # (str, bytes) tuples: checked above
        message.timestamp()[1],
    )


def _record(message: Message, headers: Headers = (), timestamp_ms: int = 0) -> Record:
    """The record of ``message``; without ``headers`` when they cannot be read."""
    return Record(
        topic=message.topic() or "",
        partition=message.partition() or 0,
        offset=message.offset() or 0,
        key=message.key(),
        value=message.value() or b"",
        headers=headers,
        timestamp_ms=timestamp_ms,
    )


def _header_bytes(value: str | bytes | None) -> bytes:
    if value is None:
        return b""
    return value.encode() if isinstance(value, str) else value


def read_messages(messages: Iterable[Message]) -> tuple[list[Record], list[Rejection]]:
    """Records of ``messages``, and a ``malformed`` rejection (without the unreadable
    headers) for each message that :func:`to_record` cannot read."""
    records: list[Record] = []
    unreadable: list[Rejection] = []
    for message in messages:
        try:
            records.append(to_record(message))
        except Exception as exc:
            detail = f"unreadable Kafka record (headers dropped): {type(exc).__name__}: {exc}"
            unreadable.append(Rejection(_record(message), "malformed", detail))
    return records, unreadable


def next_offsets(batch: Iterable[Record]) -> list[TopicPartition]:
    """Per partition, the offset after the last record of ``batch`` (what to commit)."""
    last: dict[Partition, int] = {}
    for record in batch:
        key = (record.topic, record.partition)
        if last.get(key, -1) < record.offset:
            last[key] = record.offset
    return [TopicPartition(t, p, o + 1) for (t, p), o in last.items()]


def first_offsets(batch: Iterable[Record]) -> list[TopicPartition]:
    """Per partition, the offset of the first record of ``batch`` (where to rewind)."""
    first: dict[Partition, int] = {}
    for record in batch:
        key = (record.topic, record.partition)
        first[key] = min(first.get(key, record.offset), record.offset)
    return [TopicPartition(t, p, o) for (t, p), o in first.items()]

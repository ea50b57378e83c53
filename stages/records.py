"""The records a stage consumes and the outputs it hands back to the runtime."""

from __future__ import annotations

import os
from dataclasses import dataclass

from schemas import Headers

HeaderList = list[tuple[str, str | bytes | None]]


@dataclass(frozen=True, slots=True)
class Record:
    """One consumed Kafka record, with what is needed to commit or dead-letter it."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes
    headers: tuple[tuple[str, bytes], ...] = ()
    timestamp_ms: int = 0

    def header(self, name: str) -> bytes | None:
        for key, value in self.headers:
            if key == name:
                return value
        return None


@dataclass(frozen=True, slots=True)
class Output:
    """A record to produce."""

    topic: str
    key: bytes | None
    value: bytes
    headers: HeaderList


@dataclass(frozen=True, slots=True)
class Rejection:
    """A consumed record that goes to the DLQ, untouched, with why."""

    record: Record
    reason: str
    detail: str


@dataclass(slots=True)
class BatchOutcome:
    """What a stage made of a batch: outputs to produce and records to dead-letter.

    Every consumed record must end up accounted for by the stage (an output derived from it,
    or a rejection); the runtime commits the whole batch's offsets once all are delivered.
    """

    outputs: list[Output]
    rejected: list[Rejection]

    @classmethod
    def empty(cls) -> BatchOutcome:
        return cls(outputs=[], rejected=[])

    def extend(self, other: BatchOutcome) -> None:
        self.outputs.extend(other.outputs)
        self.rejected.extend(other.rejected)


def new_traceparent() -> bytes:
    """A fresh W3C traceparent (version 00, random trace and span ids, sampled)."""
    return f"00-{os.urandom(16).hex()}-{os.urandom(8).hex()}-01".encode()


def child_traceparent(parent: bytes | None) -> bytes:
    """Same trace as ``parent``, new span id; a fresh trace when ``parent`` is malformed."""
    if parent is not None:
        parts = parent.split(b"-")
        if len(parts) == 4 and len(parts[1]) == 32 and len(parts[2]) == 16:
            return b"-".join((parts[0], parts[1], os.urandom(8).hex().encode(), parts[3]))
    return new_traceparent()


def output_headers(source: Record | None, schema: str) -> HeaderList:
    """Headers for an output derived from ``source``: content-type, schema, traceparent."""
    parent = source.header(Headers.TRACEPARENT) if source is not None else None
    return [
        (Headers.CONTENT_TYPE, Headers.MSGPACK),
        (Headers.SCHEMA, schema.encode()),
        (Headers.TRACEPARENT, child_traceparent(parent)),
    ]

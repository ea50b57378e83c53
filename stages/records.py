"""The records a stage consumes and the outputs it hands back to the runtime.

:class:`Record`, :class:`Output` and :class:`Rejection` are made per record, so they are
msgspec Structs (frozen, slotted, built in C: about 8x cheaper than a frozen dataclass) that
the garbage collector does not track (``gc=False``: they cannot be part of a reference cycle,
they hold only bytes, strings, numbers and tuples or lists of those, and a Record), so a
batch of them does not trigger collections. Fields and constructors are those of the frozen
dataclasses they replace; copy with :func:`msgspec.structs.replace`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

import msgspec

from schemas import Headers
from schemas.headers import HeaderList as HeaderList
from schemas.traceparent import propagated_traceparent


class Record(msgspec.Struct, frozen=True, gc=False):
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


class Output(msgspec.Struct, frozen=True, gc=False):
    """A record to produce. ``headers`` is a list: a tracer rewrites ``traceparent`` in place
    (:mod:`stages.tracing`)."""

    topic: str
    key: bytes | None
    value: bytes
    headers: HeaderList


# What a record adds to its size on the wire besides key, value and headers, rounded up: the
# record's own fields (librdkafka's RD_KAFKAP_MESSAGE_V2_MAX_OVERHEAD, 36 bytes) and the
# batch header around it (61 bytes). Plus, per header, its two length varints (10 bytes).
RECORD_OVERHEAD_BYTES = 128
HEADER_OVERHEAD_BYTES = 10


def wire_size(output: Output) -> int:
    """A conservative estimate of ``output``'s size as the producer counts it against
    ``message.max.bytes`` (never less than what librdkafka computes)."""
    size = RECORD_OVERHEAD_BYTES + len(output.key or b"") + len(output.value)
    for name, value in output.headers:  # per output: the common cases without a call
        size += HEADER_OVERHEAD_BYTES + (len(name) if name.isascii() else len(name.encode()))
        size += len(value) if value.__class__ is bytes else _header_len(value)
    return size


def _header_len(value: str | bytes | None) -> int:
    if value is None:
        return 0
    return len(value.encode()) if isinstance(value, str) else len(value)


class Rejection(msgspec.Struct, frozen=True, gc=False):
    """A consumed record that goes to the DLQ, untouched, with why. ``stage`` names the step
    that refused it when that is not the runner's stage (the fused topology's steps)."""

    record: Record
    reason: str
    detail: str
    stage: str | None = None


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


_CONTENT_TYPE: Final = (Headers.CONTENT_TYPE, Headers.MSGPACK)
_schema_headers: dict[str, tuple[str, bytes]] = {}  # per schema name: its header, made once


def output_headers(source: Record | None, schema: str) -> HeaderList:
    """Headers for an output derived from ``source``: content-type, schema, traceparent, and
    the source's tenant (so persist stores the result under the tenant ingest set).

    ``traceparent`` is the source's (a fresh trace when it has none or a malformed one): a
    stage records no span of its own unless tracing is on, and then its tracer rewrites the
    header to name the record's span (:meth:`stages.tracing.BatchTrace.outcome`). One pass
    over the source's headers; the constant pairs are shared, not rebuilt per record."""
    schema_header = _schema_headers.get(schema)
    if schema_header is None:
        schema_header = _schema_headers[schema] = (Headers.SCHEMA, schema.encode())
    parent = tenant = None
    if source is not None:
        for name, value in source.headers:  # the first of each, as Record.header finds it
            if name == Headers.TRACEPARENT:
                parent = value if parent is None else parent
            elif name == Headers.TENANT:
                tenant = value if tenant is None else tenant
    headers: HeaderList = [
        _CONTENT_TYPE,
        schema_header,
        (Headers.TRACEPARENT, propagated_traceparent(parent)),
    ]
    if tenant is not None:
        headers.append((Headers.TENANT, tenant))
    return headers

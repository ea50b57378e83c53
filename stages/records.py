"""The records a stage consumes and the outputs it hands back to the runtime."""

from __future__ import annotations

from dataclasses import dataclass

from schemas import Headers
from schemas.headers import HeaderList as HeaderList
from schemas.traceparent import child_traceparent


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


# What a record adds to its size on the wire besides key, value and headers, rounded up: the
# record's own fields (librdkafka's RD_KAFKAP_MESSAGE_V2_MAX_OVERHEAD, 36 bytes) and the
# batch header around it (61 bytes). Plus, per header, its two length varints (10 bytes).
RECORD_OVERHEAD_BYTES = 128
HEADER_OVERHEAD_BYTES = 10


def wire_size(output: Output) -> int:
    """A conservative estimate of ``output``'s size as the producer counts it against
    ``message.max.bytes`` (never less than what librdkafka computes)."""
    size = RECORD_OVERHEAD_BYTES + len(output.key or b"") + len(output.value)
    for name, value in output.headers:
        size += HEADER_OVERHEAD_BYTES + len(name.encode()) + _header_len(value)
    return size


def _header_len(value: str | bytes | None) -> int:
    if value is None:
        return 0
    return len(value.encode()) if isinstance(value, str) else len(value)


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


def output_headers(source: Record | None, schema: str) -> HeaderList:
    """Headers for an output derived from ``source``: content-type, schema, traceparent, and
    the source's tenant (so persist stores the result under the tenant ingest set)."""
    parent = source.header(Headers.TRACEPARENT) if source is not None else None
    headers: HeaderList = [
        (Headers.CONTENT_TYPE, Headers.MSGPACK),
        (Headers.SCHEMA, schema.encode()),
        (Headers.TRACEPARENT, child_traceparent(parent)),
    ]
    tenant = source.header(Headers.TENANT) if source is not None else None
    if tenant is not None:
        headers.append((Headers.TENANT, tenant))
    return headers

"""Kafka header names used across the pipeline."""

from __future__ import annotations

from typing import Final

# Headers as confluent-kafka's ``produce`` takes them (consumed records carry bytes values).
HeaderList = list[tuple[str, str | bytes | None]]


class Headers:
    """Header names. Values are UTF-8 bytes."""

    CONTENT_TYPE: Final = "content-type"
    SCHEMA: Final = "schema"
    TRACEPARENT: Final = "traceparent"
    # Set by ingest from the API key, never from the body; stages copy it onto their outputs
    # (and dead letters keep it). Absent: the default tenant (see schemas/keys.py).
    TENANT: Final = "streaminfer.tenant"

    DLQ_STAGE: Final = "dlq.stage"
    DLQ_REASON: Final = "dlq.reason"
    DLQ_ERROR: Final = "dlq.error"
    DLQ_SOURCE_TOPIC: Final = "dlq.source.topic"
    DLQ_SOURCE_PARTITION: Final = "dlq.source.partition"
    DLQ_SOURCE_OFFSET: Final = "dlq.source.offset"
    # On a dead letter that would exceed the producer's maximum: the original value's length
    # in bytes; the value carried is a prefix of it.
    DLQ_TRUNCATED: Final = "dlq.truncated"

    MSGPACK: Final = b"application/msgpack"

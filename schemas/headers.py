"""Kafka header names used across the pipeline."""

from __future__ import annotations

from typing import Final


class Headers:
    """Header names. Values are UTF-8 bytes."""

    CONTENT_TYPE: Final = "content-type"
    SCHEMA: Final = "schema"
    TRACEPARENT: Final = "traceparent"

    DLQ_STAGE: Final = "dlq.stage"
    DLQ_REASON: Final = "dlq.reason"
    DLQ_ERROR: Final = "dlq.error"
    DLQ_SOURCE_TOPIC: Final = "dlq.source.topic"
    DLQ_SOURCE_PARTITION: Final = "dlq.source.partition"
    DLQ_SOURCE_OFFSET: Final = "dlq.source.offset"

    MSGPACK: Final = b"application/msgpack"

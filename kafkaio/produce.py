"""Producing records: wait for room in the local queue, and produce inference requests.

Every request record: key = partition key (the client's entity key when given, else the
request id), headers ``content-type``, ``schema``, ``traceparent`` (a new trace), value =
MessagePack ``RequestV1``. The HTTP API, ``streaminfer produce``, backfills and replays all
write requests through :func:`produce_request`.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Final

from confluent_kafka import KafkaError, KafkaException, Message, Producer

from schemas import Codec, Headers, RequestV1
from schemas.headers import HeaderList
from schemas.messages import SCHEMA_NAMES
from schemas.traceparent import new_traceparent

DeliveryCallback = Callable[[KafkaError | None, Message], None]
REQUEST_SCHEMA: Final = SCHEMA_NAMES[RequestV1].encode()
_ROOM_WAIT_S: Final = 0.05


class RecordTooLarge(Exception):
    """The producer refuses the record for its size: over ``message.max.bytes``, or more than
    its local queue holds even when empty. Waiting cannot help."""


class QueueStuck(Exception):
    """The local queue stayed full for the whole timeout: nothing is being delivered."""


def produce_waiting(
    producer: Producer,
    topic: str,
    *,
    value: bytes,
    key: bytes | None,
    headers: HeaderList,
    on_delivery: DeliveryCallback | None = None,
    queue_timeout_s: float | None = None,
) -> None:
    """``producer.produce`` that waits for room when the local queue is full.

    librdkafka raises ``BufferError`` instead of blocking; serving delivery reports
    (``poll``) is what frees the queue, so that is what the wait does. Raises
    :class:`RecordTooLarge` at once when waiting cannot help, and :class:`QueueStuck` when
    the queue stays full for ``queue_timeout_s`` (None: wait as long as it takes).
    """
    deadline: float | None = None
    while True:
        try:
            producer.produce(topic, value=value, key=key, headers=headers, on_delivery=on_delivery)
            return
        except BufferError as exc:
            if len(producer) == 0:
                raise RecordTooLarge("the record does not fit the empty local queue") from exc
            if queue_timeout_s is not None:
                deadline = deadline or time.monotonic() + queue_timeout_s
                if time.monotonic() > deadline:
                    raise QueueStuck(f"producer queue full for {queue_timeout_s:.0f}s") from exc
            producer.poll(_ROOM_WAIT_S)
        except KafkaException as exc:
            if is_too_large(exc.args[0]):
                raise RecordTooLarge(str(exc.args[0])) from exc
            raise


def is_too_large(error: object) -> bool:
    """Whether ``error`` (a ``KafkaError``) says the record is over the size limit."""
    return isinstance(error, KafkaError) and error.code() == KafkaError.MSG_SIZE_TOO_LARGE


def request_headers(*, tenant: bytes | None = None, traceparent: bytes | None = None) -> HeaderList:
    """The headers of a new request record: content-type, schema, a traceparent (a fresh
    trace unless the caller started one: ingest's root span when tracing is on), and the
    tenant when one is given (set by ingest from the API key)."""
    headers: HeaderList = [
        (Headers.CONTENT_TYPE, Headers.MSGPACK),
        (Headers.SCHEMA, REQUEST_SCHEMA),
        (Headers.TRACEPARENT, traceparent or new_traceparent()),
    ]
    if tenant is not None:
        headers.append((Headers.TENANT, tenant))
    return headers


def produce_request(
    producer: Producer,
    topic: str,
    *,
    value: bytes,
    key: bytes,
    on_delivery: DeliveryCallback | None,
    tenant: bytes | None = None,
    wait_for_room: bool = True,
    traceparent: bytes | None = None,
) -> None:
    """Produce one encoded ``RequestV1`` with the request headers.

    ``wait_for_room=False`` lets ``BufferError`` through: a caller that must not block
    (the HTTP API's event loop) turns a full queue into backpressure itself.
    """
    headers = request_headers(tenant=tenant, traceparent=traceparent)
    if wait_for_room:
        produce_waiting(
            producer, topic, value=value, key=key, headers=headers, on_delivery=on_delivery
        )
    else:
        producer.produce(topic, value=value, key=key, headers=headers, on_delivery=on_delivery)


class RequestProducer:
    """Produces ``RequestV1`` records; ``flush()`` reports how many Kafka did not accept."""

    def __init__(self, *, producer: Producer, topic: str) -> None:
        self._producer = producer
        self._topic = topic
        self._codec = Codec(RequestV1)
        self.failed: list[str] = []

    def send(self, request: RequestV1, *, partition_key: str | None = None) -> None:
        """Queue ``request`` (waiting for room in the local queue when it is full)."""
        produce_request(
            self._producer,
            self._topic,
            value=self._codec.encode(request),
            key=(partition_key or request.id).encode(),
            on_delivery=self._on_delivery,
        )

    def flush(self, timeout_s: float = 30.0) -> int:
        """Wait for every delivery report; returns the number not acknowledged."""
        return self._producer.flush(timeout_s) + len(self.failed)

    def _on_delivery(self, err: KafkaError | None, msg: Message) -> None:
        if err is not None:
            self.failed.append(f"{msg.key()!r}: {err}")

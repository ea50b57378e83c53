"""Writes inference requests to Kafka with the pipeline's headers.

Every record: key = partition key (the client's entity key when given, else the request id),
headers ``content-type``, ``schema``, ``traceparent``, value = MessagePack ``RequestV1``.
"""

from __future__ import annotations

from confluent_kafka import KafkaError, Message, Producer

from schemas import Codec, Headers, RequestV1
from schemas.messages import SCHEMA_NAMES
from stages.records import HeaderList, new_traceparent

_SCHEMA = SCHEMA_NAMES[RequestV1].encode()


class RequestProducer:
    """Produces ``RequestV1`` records; ``flush()`` reports how many Kafka did not accept."""

    def __init__(self, *, producer: Producer, topic: str) -> None:
        self._producer = producer
        self._topic = topic
        self._codec = Codec(RequestV1)
        self.failed: list[str] = []

    def send(self, request: RequestV1, *, partition_key: str | None = None) -> None:
        key = (partition_key or request.id).encode()
        headers: HeaderList = [
            (Headers.CONTENT_TYPE, Headers.MSGPACK),
            (Headers.SCHEMA, _SCHEMA),
            (Headers.TRACEPARENT, new_traceparent()),
        ]
        value = self._codec.encode(request)
        while True:
            try:
                self._producer.produce(
                    self._topic,
                    value=value,
                    key=key,
                    headers=headers,
                    on_delivery=self._on_delivery,
                )
                return
            except BufferError:
                self._producer.poll(0.05)  # local queue full: let deliveries drain

    def flush(self, timeout_s: float = 30.0) -> int:
        """Wait for every delivery report; returns the number not acknowledged."""
        return self._producer.flush(timeout_s) + len(self.failed)

    def _on_delivery(self, err: KafkaError | None, msg: Message) -> None:
        if err is not None:
            self.failed.append(f"{msg.key()!r}: {err}")

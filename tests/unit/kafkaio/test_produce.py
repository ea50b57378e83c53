"""Producing requests: the headers every request carries, and waiting for room."""

from __future__ import annotations

import re
from typing import Any

import pytest
from confluent_kafka import KafkaError, KafkaException, Producer

from kafkaio.produce import (
    QueueStuck,
    RecordTooLarge,
    RequestProducer,
    produce_request,
    produce_waiting,
)
from schemas import Headers
from tests.helpers import REQUESTS, digits_request, holdout

W3C = re.compile(rb"^00-[0-9a-f]{32}-[0-9a-f]{16}-01$")


class FullThenRoomy:
    """A producer whose local queue is full for the first ``full`` calls; ``queued`` records
    are in it meanwhile (0: the record is too large for even an empty queue)."""

    def __init__(self, full: int = 0, queued: int = 1) -> None:
        self.full = full
        self.queued = queued
        self.polls = 0
        self.produced: list[dict[str, Any]] = []

    def __len__(self) -> int:
        return self.queued

    def produce(self, topic: str, **kwargs: Any) -> None:
        if self.full > 0:
            self.full -= 1
            raise BufferError("Local: Queue full")
        self.produced.append({"topic": topic, **kwargs})

    def poll(self, _timeout: float) -> int:
        self.polls += 1
        return 0

    def flush(self, _timeout: float) -> int:
        return 0


def as_producer(fake: FullThenRoomy) -> Producer:
    return fake  # type: ignore[return-value]  # duck-typed stand-in for the C class


def test_a_request_carries_content_type_schema_traceparent_and_its_key() -> None:
    fake = FullThenRoomy()
    request = digits_request(holdout()[0][0], request_id="r-1")
    RequestProducer(producer=as_producer(fake), topic="requests").send(
        request, partition_key="customer-7"
    )
    (record,) = fake.produced
    headers = dict(record["headers"])
    assert headers[Headers.CONTENT_TYPE] == b"application/msgpack"
    assert headers[Headers.SCHEMA] == b"inference.request/1"
    assert W3C.match(headers[Headers.TRACEPARENT])
    assert Headers.TENANT not in headers
    assert record["key"] == b"customer-7"
    assert REQUESTS.decode(record["value"]) == request


def test_the_key_defaults_to_the_request_id_and_every_trace_is_new() -> None:
    fake = FullThenRoomy()
    sender = RequestProducer(producer=as_producer(fake), topic="requests")
    for i in range(2):
        sender.send(digits_request(holdout()[0][0], request_id=f"r-{i}"))
    assert [r["key"] for r in fake.produced] == [b"r-0", b"r-1"]
    first, second = (dict(r["headers"])[Headers.TRACEPARENT] for r in fake.produced)
    assert first != second


def test_a_tenant_goes_into_its_header() -> None:
    fake = FullThenRoomy()
    produce_request(
        as_producer(fake), "requests", value=b"v", key=b"k", on_delivery=None, tenant=b"acme"
    )
    assert dict(fake.produced[0]["headers"])[Headers.TENANT] == b"acme"


def test_a_full_queue_is_waited_out_by_serving_deliveries() -> None:
    fake = FullThenRoomy(full=3)
    produce_waiting(as_producer(fake), "t", value=b"v", key=None, headers=[])
    assert len(fake.produced) == 1 and fake.polls == 3


def test_without_waiting_a_full_queue_is_the_callers_to_handle() -> None:
    fake = FullThenRoomy(full=1)
    with pytest.raises(BufferError):
        produce_request(
            as_producer(fake), "t", value=b"v", key=b"k", on_delivery=None, wait_for_room=False
        )
    assert fake.produced == [] and fake.polls == 0


def test_a_record_the_empty_queue_cannot_hold_is_too_large_at_once() -> None:
    fake = FullThenRoomy(full=1, queued=0)
    with pytest.raises(RecordTooLarge):
        produce_waiting(as_producer(fake), "t", value=b"v", key=None, headers=[])
    assert fake.polls == 0


def test_a_record_over_the_size_limit_is_too_large() -> None:
    class Refusing(FullThenRoomy):
        def produce(self, topic: str, **kwargs: Any) -> None:
            raise KafkaException(KafkaError(KafkaError.MSG_SIZE_TOO_LARGE))

    with pytest.raises(RecordTooLarge):
        produce_waiting(as_producer(Refusing()), "t", value=b"v", key=None, headers=[])


def test_a_queue_that_stays_full_is_stuck_after_the_timeout() -> None:
    fake = FullThenRoomy(full=10**9)
    with pytest.raises(QueueStuck):
        produce_waiting(
            as_producer(fake), "t", value=b"v", key=None, headers=[], queue_timeout_s=0.2
        )
    assert fake.polls >= 2

"""Kafka delivery reports bridged to asyncio futures, with a real librdkafka producer."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Iterator
from typing import Any

import pytest
from confluent_kafka import Producer

from ingest.delivery import NO_REPORT, AsyncProducer, Delivery, QueueFull
from ingest.payloads import Submission
from schemas import Codec, RequestV1
from tests.helpers import digits_request, holdout


@pytest.fixture()
def closed_port() -> Iterator[int]:
    """A port that refuses connections: bound (so nobody else takes it) but not listening."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        yield sock.getsockname()[1]


def submissions(count: int) -> list[Submission]:
    features, _ = holdout()
    codec = Codec(RequestV1)
    out = []
    for i in range(count):
        request = digits_request(features[i], request_id=f"r{i}")
        out.append(
            Submission(request=request, value=codec.encode(request), partition_key=request.id)
        )
    return out


class CountingProducer(Producer):
    """The real producer, counting ``produce()`` calls (librdkafka's own queue length also
    counts error events, so it cannot tell whether a record was queued)."""

    produced = 0

    def produce(self, *args: Any, **kwargs: Any) -> None:
        self.produced += 1
        super().produce(*args, **kwargs)


def unreachable_producer(
    port: int, *, queue_limit: int = 100
) -> tuple[AsyncProducer, CountingProducer]:
    kafka = CountingProducer(
        {
            "bootstrap.servers": f"127.0.0.1:{port}",
            "enable.idempotence": True,
            "acks": "all",
            "delivery.timeout.ms": 500,
            "log_level": 0,
        }
    )
    return AsyncProducer(producer=kafka, topic="t", queue_limit=queue_limit), kafka


def test_unreachable_kafka_settles_the_future_with_every_id_failed(closed_port: int) -> None:
    producer, kafka = unreachable_producer(closed_port)
    producer.start()

    async def send() -> tuple[float, Delivery]:
        started = time.monotonic()
        delivery = await asyncio.wait_for(producer.send(submissions(3)), 10)
        return time.monotonic() - started, delivery

    try:
        seconds, delivery = asyncio.run(send())
    finally:
        producer.close(0)
    assert not delivery.ok
    assert sorted(delivery.failed) == ["r0", "r1", "r2"]
    assert delivery.acknowledged == []
    assert seconds < 5
    assert kafka.produced == 3


def test_a_batch_that_does_not_fit_the_queue_is_refused_whole(closed_port: int) -> None:
    producer, kafka = unreachable_producer(closed_port, queue_limit=50)

    async def send(count: int) -> None:
        producer.send(submissions(count))

    with pytest.raises(QueueFull):
        asyncio.run(send(60))
    assert kafka.produced == 0  # no record of the batch was queued
    asyncio.run(send(3))
    assert kafka.produced == 3
    producer.close(0)


def test_a_batch_whose_reports_do_not_come_in_time_fails_whole(closed_port: int) -> None:
    kafka = Producer(
        {
            "bootstrap.servers": f"127.0.0.1:{closed_port}",
            "delivery.timeout.ms": 30_000,  # librdkafka would report only after this
            "log_level": 0,
        }
    )
    producer = AsyncProducer(producer=kafka, topic="t", queue_limit=100, report_timeout_s=0.3)

    async def send() -> tuple[float, Delivery]:
        started = time.monotonic()
        delivery = await asyncio.wait_for(producer.send(submissions(2)), 10)
        return time.monotonic() - started, delivery

    try:
        seconds, delivery = asyncio.run(send())
    finally:
        producer.close(0)
    assert delivery == Delivery(failed={"r0": NO_REPORT, "r1": NO_REPORT})
    assert 0.3 <= seconds < 5

"""``streaminfer demo``: the whole pipeline end to end on the digits model.

Brings the local stack up, sends the held-out rows (``--repeat`` times) as requests, waits
until every result is in Redis, prints count, accuracy against the true labels, throughput
and latency (``created_at`` -> stored), and stops what it started.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from confluent_kafka import Consumer, TopicPartition

from kafkaio.offsets import end_offsets
from kafkaio.produce import RequestProducer
from schemas import Codec, RequestV1, ResultV1, StoredV1, tensor_from_array
from streaminfer import stack
from streaminfer.kafka import make_consumer, make_producer
from streaminfer.settings import Settings
from streaminfer.wiring import result_store


@dataclass(frozen=True, slots=True)
class DemoReport:
    sent: int
    stored: int
    correct: int
    seconds: float
    latencies_s: list[float]

    @property
    def accuracy(self) -> float:
        return self.correct / self.stored if self.stored else 0.0

    def lines(self) -> list[str]:
        lat = np.array(self.latencies_s) * 1000
        p50, p99 = np.percentile(lat, [50, 99]) if lat.size else (float("nan"),) * 2
        return [
            f"requests sent      {self.sent}",
            f"results in Redis   {self.stored}",
            f"accuracy           {self.accuracy:.4f} ({self.correct}/{self.stored})",
            f"throughput         {self.stored / self.seconds:,.0f} results/s "
            f"({self.seconds:.2f}s first send -> last stored)",
            f"latency p50 / p99  {p50:.1f} ms / {p99:.1f} ms (created_at -> stored)",
        ]


def run_demo(
    settings: Settings, *, repeat: int, timeout_s: float, keep_up: bool, echo: Callable[[str], None]
) -> DemoReport:
    started = stack.up(settings, echo=echo)
    try:
        stack.wait_for_stages(settings)
        return send_and_collect(settings, repeat=repeat, timeout_s=timeout_s, echo=echo)
    finally:
        if not keep_up:
            stack.down(settings, only=started, echo=echo)


def send_and_collect(
    settings: Settings, *, repeat: int, timeout_s: float, echo: Callable[[str], None]
) -> DemoReport:
    holdout = np.load(settings.stage.models_dir / "digits" / "holdout.npz")
    features, labels = holdout["X"].astype(np.float32), holdout["y"]
    run = uuid.uuid4().hex[:8]
    notices = _stored_notices_from_now(settings)
    producer = RequestProducer(producer=make_producer(settings), topic=settings.topics.requests)
    truth: dict[str, int] = {}
    first_sent = time.time()
    for n in range(repeat):
        for row, (x, y) in enumerate(zip(features, labels, strict=True)):
            request_id = f"demo-{run}-{n}-{row}"
            truth[request_id] = int(y)
            request = RequestV1(
                id=request_id,
                model="digits",
                inputs={"input": tensor_from_array(x)},
                created_at=time.time(),
            )
            producer.send(request)
    if undelivered := producer.flush():
        raise RuntimeError(f"{undelivered} requests were not acknowledged by Kafka")
    echo(f"sent {len(truth)} requests; waiting for results")
    latencies, last_stored = _collect(notices, set(truth), timeout_s)
    correct, stored = _score(settings, truth)
    return DemoReport(
        sent=len(truth),
        stored=stored,
        correct=correct,
        seconds=max(last_stored - first_sent, 1e-9),
        latencies_s=latencies,
    )


def _stored_notices_from_now(settings: Settings) -> Consumer:
    """A consumer of ``inference.stored`` positioned at its current end."""
    consumer = make_consumer(settings, group_id=f"streaminfer-demo-{uuid.uuid4().hex}")
    topic = settings.topics.stored
    ends = end_offsets(consumer, topic)
    consumer.assign([TopicPartition(topic, p, end) for p, end in ends.items()])
    return consumer


def _collect(consumer: Consumer, wanted: set[str], timeout_s: float) -> tuple[list[float], float]:
    codec = Codec(StoredV1)
    latencies: list[float] = []
    last_stored = 0.0
    deadline = time.monotonic() + timeout_s
    pending = set(wanted)
    try:
        while pending and time.monotonic() < deadline:
            for message in consumer.consume(num_messages=1000, timeout=0.5):
                if message.error():
                    continue
                notice = codec.decode(message.value() or b"")
                if notice.id in pending:
                    pending.discard(notice.id)
                    latencies.append(notice.stored_at - notice.created_at)
                    last_stored = max(last_stored, notice.stored_at)
    finally:
        consumer.close()
    if pending:
        raise TimeoutError(f"{len(pending)} of {len(wanted)} results not stored in {timeout_s}s")
    return latencies, last_stored


def _score(settings: Settings, truth: dict[str, int]) -> tuple[int, int]:
    """(correct, stored) read back from Redis, the store users query."""
    store = result_store(settings)
    tenant = settings.kafka.default_tenant  # the demo produces to Kafka, without a tenant
    codec = Codec(ResultV1)
    ids = list(truth)
    correct = stored = 0
    for start in range(0, len(ids), 1000):
        chunk = ids[start : start + 1000]
        for request_id, value in zip(chunk, store.get_many(tenant, chunk), strict=True):
            if value is None:
                continue
            stored += 1
            correct += codec.decode(value).label == str(truth[request_id])
    return correct, stored

"""The load generator and result collector shared by every pipeline under test.

It writes MessagePack ``RequestV1`` records (the digits held-out rows, cycled) to the
requests topic and reads ``StoredV1`` notices from the stored topic: a notice carries the
request's ``created_at`` and the ``stored_at`` after the Redis write, so latency is
``stored_at - created_at`` for every pipeline alike (ours, faust, Quix).

Open loop: request ``i`` is due at ``t0 + i / rate`` and its ``created_at`` is that due time,
so a generator or pipeline that falls behind shows up as latency (no coordinated omission).
Closed loop: at most ``window`` requests outstanding (sent, not yet stored) until ``count``.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field

import numpy as np
from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition

from bench.options import ScenarioSpec
from kafkaio.offsets import partitions
from kafkaio.produce import RequestProducer
from schemas import Codec, RequestV1, ResultV1, StoredV1, Tensor, Topics, tensor_from_array
from streaminfer.kafka import make_consumer, make_producer
from streaminfer.settings import Settings
from streaminfer.wiring import result_store


@dataclass(slots=True)
class Measurement:
    """What came back for one scenario (times are epoch seconds)."""

    spec: ScenarioSpec
    started: float
    sent: int = 0
    send_done: float = 0.0
    created: list[float] = field(default_factory=list)
    stored: list[float] = field(default_factory=list)
    duplicates: int = 0
    ids: list[str] = field(default_factory=list)
    # Median ms spent in each hop, from a sample of stored results (``Driver._breakdown``).
    hops_ms: dict[str, float] = field(default_factory=dict)

    @property
    def latencies_ms(self) -> np.ndarray:
        stored = np.asarray(self.stored, dtype=np.float64)
        created = np.asarray(self.created, dtype=np.float64)
        latencies: np.ndarray = (stored - created) * 1000.0
        return latencies


class Driver:
    """Sends requests to one pipeline's topics and collects its stored notices."""

    def __init__(self, settings: Settings, topics: Topics) -> None:
        holdout = np.load(settings.stage.models_dir / "digits" / "holdout.npz")
        features = holdout["X"].astype(np.float32)
        self._inputs: list[dict[str, Tensor]] = [{"input": tensor_from_array(x)} for x in features]
        # linger 1 ms: a client that cares about latency; acks=all + idempotence as ingest does.
        self._producer = make_producer(settings, **{"linger.ms": 1})
        self._sender = RequestProducer(producer=self._producer, topic=topics.requests)
        self._notices = _consumer_from_start(settings, topics.stored)
        self._codec = Codec(StoredV1)
        self._results = Codec(ResultV1)
        self._store = result_store(settings.with_changes(kafka={"topic_prefix": topics.prefix}))
        self._tenant = settings.kafka.default_tenant  # requests go to Kafka without a tenant
        self._pending: dict[str, float] = {}

    def close(self) -> None:
        self._sender.flush(10)
        self._notices.close()

    def run(self, spec: ScenarioSpec, *, timeout_s: float) -> Measurement:
        """Drive ``spec`` and wait (up to ``timeout_s`` after the last send) for every result."""
        run_id = uuid.uuid4().hex[:8]
        result = Measurement(spec=spec, started=time.time())
        if spec.rate is None:
            self._closed_loop(spec, run_id, result)
        else:
            self._open_loop(spec, spec.rate, run_id, result)
        result.send_done = time.time()
        self._sender.flush(30)
        deadline = time.monotonic() + timeout_s
        while self._pending and time.monotonic() < deadline:
            self._collect(result, 0.1)
        self._pending.clear()  # whatever is still missing counts as lost
        result.hops_ms = self._breakdown(result)
        return result

    def _breakdown(self, m: Measurement, sample: int = 2000) -> dict[str, float]:
        """Median ms per hop (created -> validated -> inferred -> stored) over a sample of the
        stored results: the per-stage timestamps travel in each ``ResultV1``."""
        step = max(1, len(m.ids) // sample)
        picked = list(range(0, len(m.ids), step))
        values = self._store.get_many(self._tenant, [m.ids[i] for i in picked])
        hops: dict[str, list[float]] = {"to validated": [], "to inferred": [], "to stored": []}
        for i, value in zip(picked, values, strict=True):
            if value is None:
                continue
            result = self._results.decode(value)
            validated = result.timings.get("validated", result.created_at)
            inferred = result.timings.get("inferred", validated)
            hops["to validated"].append(validated - result.created_at)
            hops["to inferred"].append(inferred - validated)
            hops["to stored"].append(m.stored[i] - inferred)
        return {k: round(float(np.median(v)) * 1000, 2) for k, v in hops.items() if v}

    def _open_loop(self, spec: ScenarioSpec, rate: float, run_id: str, out: Measurement) -> None:
        t0 = time.time()
        while out.sent < spec.count:
            due = min(spec.count, int((time.time() - t0) * rate) + 1)
            while out.sent < due:
                self._send(run_id, out, created_at=t0 + out.sent / rate)
            # Wait for the next due time by reading notices (never sleep past it).
            next_due = t0 + out.sent / rate
            self._collect(out, max(0.0, min(0.005, next_due - time.time())))

    def _closed_loop(self, spec: ScenarioSpec, run_id: str, out: Measurement) -> None:
        while out.sent < spec.count:
            room = min(spec.window - len(self._pending), spec.count - out.sent)
            for _ in range(room):
                self._send(run_id, out, created_at=time.time())
            self._collect(out, 0.002 if room else 0.05)

    def _send(self, run_id: str, out: Measurement, *, created_at: float) -> None:
        request_id = f"{run_id}-{out.sent}"
        request = RequestV1(
            id=request_id,
            model="digits",
            inputs=self._inputs[out.sent % len(self._inputs)],
            created_at=created_at,
        )
        self._sender.send(request)
        self._pending[request_id] = created_at
        out.sent += 1
        if out.sent % 1000 == 0:
            self._producer.poll(0)  # serve delivery reports as we go

    def _collect(self, out: Measurement, timeout_s: float) -> None:
        for message in self._notices.consume(num_messages=10_000, timeout=timeout_s):
            if message.error():
                continue
            notice = self._codec.decode(message.value() or b"")
            if self._pending.pop(notice.id, None) is None:
                out.duplicates += 1  # at-least-once redelivery, or a straggler of a warm-up
                continue
            out.created.append(notice.created_at)
            out.stored.append(notice.stored_at)
            out.ids.append(notice.id)


def _consumer_from_start(settings: Settings, topic: str) -> Consumer:
    """A consumer of every partition of ``topic`` from the beginning (read_committed); the
    topic was created for this run, so everything in it is ours."""
    consumer = make_consumer(settings, group_id=f"bench-{uuid.uuid4().hex}")
    starts = [TopicPartition(topic, p, OFFSET_BEGINNING) for p in partitions(consumer, topic)]
    consumer.assign(starts)
    return consumer

"""Poison records on the real broker: no record stops a stage.

Hostile records (:mod:`tests.hostile.records`) are written with a raw producer straight onto
each stage's input topic -- ``inference.requests``, ``inference.requests.backfill``,
``inference.validated``, ``inference.results`` -- interleaved with good requests, while the
three stages run as processes. Then:

- no worker exited or was replaced (processes alive, same group members as at the start);
- every good request has its result in Redis;
- every hostile record was dead-lettered (found on the DLQ by its ``dlq.source.*``
  headers) or processed (its id came out of the stage: a validated request, a result, a
  stored notice);
- every stage's committed offsets reached the end of every input partition: nothing is
  stuck, and since every record is accounted for, nothing was committed past a record
  that went nowhere.

A failure lists, per topic and kind, the records that went nowhere and the stages' logs.
"""

from __future__ import annotations

import random
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import redis
from confluent_kafka import (
    Consumer,
    ConsumerGroupTopicPartitions,
    KafkaError,
    Message,
    Producer,
    TopicPartition,
)
from confluent_kafka.admin import AdminClient

from kafkaio.dead_letters import decode_head, read_dead_letter
from schemas.keys import ResultKeys
from streaminfer.kafka import make_admin, make_consumer
from streaminfer.settings import Settings
from streaminfer.wiring import StageName, input_topics
from tests.fixtures import StageProcesses
from tests.helpers import REQUESTS, digits_request, holdout
from tests.hostile.records import Hostile, MessageType, generate

pytestmark = pytest.mark.hostile

SEED = 20_241_111
HOSTILE_PER_TOPIC = 75  # x 4 topics = 300
GOOD = 300
SETTLE_S = 60.0
STAGES: tuple[StageName, ...] = ("validate", "infer", "persist")


@dataclass(frozen=True, slots=True)
class Written:
    """A record as the broker placed it."""

    topic: str
    partition: int
    offset: int
    kind: str
    record_id: str | None  # of its value, when one can be read


@dataclass
class TopicTail:
    """Reads a topic from the beginning as records arrive (read_committed, no group)."""

    consumer: Consumer
    topic: str
    last_offset: dict[int, int] = field(default_factory=dict)
    ids: set[str] = field(default_factory=set)
    dead: set[tuple[str, int, int]] = field(default_factory=set)  # DLQ: source coordinates
    dead_kinds: Counter[str] = field(default_factory=Counter)

    def read(self, *, dlq: bool = False) -> None:
        while messages := self.consumer.consume(2000, timeout=0.2):
            for message in messages:
                if message.error() is not None:
                    continue
                partition, offset = message.partition() or 0, message.offset() or 0
                self.last_offset[partition] = max(self.last_offset.get(partition, -1), offset)
                if dlq:
                    letter = read_dead_letter(message)
                    if letter.source_partition is not None and letter.source_offset is not None:
                        coordinates = (
                            letter.source_topic,
                            letter.source_partition,
                            letter.source_offset,
                        )
                        self.dead.add(coordinates)
                    self.dead_kinds[letter.reason] += 1
                else:
                    head = decode_head(message.value())
                    if head is not None:
                        self.ids.add(head.id)


def _tail(settings: Settings, topic: str) -> TopicTail:
    consumer = make_consumer(settings, group_id=f"hostile-reader-{uuid.uuid4().hex}")
    partitions = consumer.list_topics(topic, timeout=10).topics[topic].partitions
    consumer.assign([TopicPartition(topic, p, 0) for p in partitions])
    return TopicTail(consumer, topic)


def _raw_producer(settings: Settings) -> Producer:
    """Nothing of ours: a plain client, as kcat or a Java producer would be."""
    return Producer(
        {
            "bootstrap.servers": settings.kafka.bootstrap_servers,
            "message.max.bytes": 1_048_576,  # more than the stages' own producers allow
            "linger.ms": 5,
        }
    )


def _plan(settings: Settings, rng: random.Random) -> list[tuple[str, Hostile]]:
    """Hostile records for each input topic and good requests, interleaved at random."""
    topics = settings.topics
    limit = settings.kafka.message_max_bytes
    targets: list[tuple[str, MessageType]] = [
        (topics.requests, "request"),
        (topics.requests_backfill, "request"),
        (topics.validated, "validated"),
        (topics.results, "result"),
    ]
    planned = [
        (topic, record)
        for index, (topic, message) in enumerate(targets)
        for record in generate(message, HOSTILE_PER_TOPIC, rng, limit=limit, tag=f"h{index}")
    ]
    features, _ = holdout()
    for i in range(GOOD):
        request = digits_request(features[i % len(features)], request_id=f"good-{i}")
        topic = topics.requests_backfill if i % 5 == 0 else topics.requests
        good = Hostile("good", request.id.encode(), REQUESTS.encode(request))
        planned.append((topic, good))
    rng.shuffle(planned)
    return planned


def _write(settings: Settings, planned: list[tuple[str, Hostile]]) -> list[Written]:
    producer = _raw_producer(settings)
    written: list[Written] = []
    failed: list[str] = []

    def delivered(kind: str, record_id: str | None) -> Callable[[KafkaError | None, Message], None]:
        def report(err: KafkaError | None, message: Message) -> None:
            if err is not None:
                failed.append(f"{kind}: {err}")
                return
            written.append(
                Written(
                    message.topic() or "",
                    message.partition() or 0,
                    message.offset() or 0,
                    kind,
                    record_id,
                )
            )

        return report

    for topic, record in planned:
        head = decode_head(record.value)
        producer.produce(
            topic,
            key=record.key,
            value=record.value,
            headers=record.headers,  # type: ignore[arg-type]  # bytes names: the point
            on_delivery=delivered(record.kind, head.id if head else None),
        )
        producer.poll(0)
    assert producer.flush(60) == 0
    assert not failed, failed[:5]
    return written


def _members(admin: AdminClient, settings: Settings) -> dict[str, set[str]]:
    groups = [settings.group_id(name) for name in STAGES]
    described = {g: f.result(timeout=10) for g, f in admin.describe_consumer_groups(groups).items()}
    return {g: {m.member_id for m in d.members} for g, d in described.items()}


def _committed_short(
    admin: AdminClient, settings: Settings, tails: dict[str, TopicTail]
) -> list[str]:
    """Partitions whose stage has not committed past their last record (a transactional
    topic's end offset also counts its commit markers: the last record is the end here)."""
    short = []
    for name in STAGES:
        group = settings.group_id(name)
        wanted = [
            TopicPartition(topic, p)
            for topic in input_topics(settings, name)
            for p in tails[topic].last_offset
        ]
        request = [ConsumerGroupTopicPartitions(group, wanted)]
        answer = admin.list_consumer_group_offsets(request)[group].result(timeout=10)
        for tp in answer.topic_partitions:
            end = tails[tp.topic].last_offset[tp.partition] + 1
            if tp.offset < end:
                short.append(f"{name} {tp.topic}[{tp.partition}] at {tp.offset} of {end}")
    return short


@dataclass
class Verdict:
    went_nowhere: list[Written]
    missing_good: list[str]
    short: list[str]
    exited: dict[str, int | None]

    @property
    def clean(self) -> bool:
        return not (self.went_nowhere or self.missing_good or self.short or self.exited)


def _verdict(
    admin: AdminClient,
    settings: Settings,
    stages: StageProcesses,
    client: redis.Redis,
    written: list[Written],
    tails: dict[str, TopicTail],
) -> Verdict:
    for tail in tails.values():
        tail.read(dlq=tail.topic == settings.topics.dlq)
    topics = settings.topics
    output_of = {
        topics.requests: topics.validated,
        topics.requests_backfill: topics.validated,
        topics.validated: topics.results,
        topics.results: topics.stored,
    }
    dead = tails[topics.dlq].dead
    nowhere = [
        w
        for w in written
        if w.kind != "good"
        and (w.topic, w.partition, w.offset) not in dead
        and (w.record_id is None or w.record_id not in tails[output_of[w.topic]].ids)
    ]
    keys = ResultKeys(settings.kafka.topic_prefix)
    good = [f"good-{i}" for i in range(GOOD)]
    values = client.mget([keys.key(settings.kafka.default_tenant, i) for i in good])
    missing = [i for i, v in zip(good, values, strict=True) if v is None]
    exited = {label: p.poll() for label, p in stages.procs.items() if p.poll() is not None}
    return Verdict(nowhere, missing, _committed_short(admin, settings, tails), exited)


def _report(verdict: Verdict, tails: dict[str, TopicTail], log_dir: Path) -> str:
    lost = Counter((w.topic.rsplit(".", 1)[-1], w.kind) for w in verdict.went_nowhere)
    lines = [f"{n:4} went nowhere: {topic} {kind}" for (topic, kind), n in sorted(lost.items())]
    lines.append(f"good requests without a result: {len(verdict.missing_good)}")
    lines += [f"not committed: {s}" for s in verdict.short[:20]]
    lines.append(f"exited: {verdict.exited}")
    for tail in tails.values():
        if tail.dead_kinds:
            lines.append(f"dead letters by reason: {dict(tail.dead_kinds)}")
    for log in sorted(log_dir.glob("*.log")):
        text = log.read_text(errors="replace")
        lines.append(f"--- {log.name} (last 1500 chars of {len(text)}) ---\n{text[-1500:]}")
    return "\n".join(lines)


@pytest.fixture()
def tails(settings: Settings) -> Iterator[dict[str, TopicTail]]:
    topics = settings.topics
    names = [
        topics.requests,
        topics.requests_backfill,
        topics.validated,
        topics.results,
        topics.stored,
        topics.dlq,
    ]
    opened = {name: _tail(settings, name) for name in names}
    yield opened
    for tail in opened.values():
        tail.consumer.close()


def test_no_hostile_record_stops_a_stage_or_goes_nowhere(
    settings: Settings,
    stages: StageProcesses,
    redis_client: redis.Redis,
    tails: dict[str, TopicTail],
    tmp_path: Path,
) -> None:
    for name in STAGES:
        stages.start(name, wait=False)
    for name in STAGES:
        stages.wait_joined(name)
    admin = make_admin(settings)
    members = _members(admin, settings)

    written = _write(settings, _plan(settings, random.Random(SEED)))
    assert len(written) == 4 * HOSTILE_PER_TOPIC + GOOD

    # Re-check until clean, a worker exits, or time is up; each round's reads block on the
    # broker (up to 0.2 s per topic), which paces the loop.
    deadline = time.monotonic() + SETTLE_S
    verdict = _verdict(admin, settings, stages, redis_client, written, tails)
    while not verdict.clean and not verdict.exited and time.monotonic() < deadline:
        verdict = _verdict(admin, settings, stages, redis_client, written, tails)

    assert verdict.clean, _report(verdict, tails, tmp_path)
    assert _members(admin, settings) == members, "a stage member was replaced"

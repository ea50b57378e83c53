"""Crashes, stalls and outages under load: nothing lost, and in exactly-once mode nothing
doubled on ``inference.results`` (as a read_committed reader sees it). Every test runs in
both processing modes; at-least-once asserts no loss and allows duplicates. And in both
topologies: split (validate, infer, persist) and fused (one process for all three), where a
test that kills, stops or scales a step does it to the fused process."""

from __future__ import annotations

import random
import signal
from collections.abc import Iterator

import pytest
import redis
from confluent_kafka import KafkaError, Message, Producer

from schemas.keys import ResultKeys
from stages.committers import EXIT_STUCK
from streaminfer.kafka import make_producer
from streaminfer.settings import Settings
from streaminfer.stack import KAFKA, REDIS
from tests.faults.harness import Ledger, ledger
from tests.fixtures import Load, StageProcesses, read_topic, wait_until
from tests.helpers import REQUESTS, digits_request, encode_raw, holdout

pytestmark = pytest.mark.faults

# Fail over in seconds, not the default 45 s: a SIGKILLed member is noticed after 6 s.
FAST_FAILOVER = '{"session.timeout.ms": 6000, "heartbeat.interval.ms": 1000}'


@pytest.fixture(params=["exactly-once", "at-least-once"])
def mode(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    monkeypatch.setenv("STREAMINFER_PROCESSING_GUARANTEE", request.param)
    monkeypatch.setenv("STREAMINFER_KAFKA_CONSUMER_EXTRA", FAST_FAILOVER)
    yield request.param


@pytest.fixture(params=["split", "fused"])
def topology(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """Set before ``settings`` (which every test below asks for after ``mode``): the stage
    processes and :meth:`StageProcesses.start_pipeline` read it from the environment."""
    monkeypatch.setenv("STREAMINFER_STAGE_TOPOLOGY", request.param)
    yield request.param


def _check(result: Ledger, mode: str) -> None:
    assert result.lost == 0, f"{result.lost} of {result.sent} results lost"
    assert result.in_redis == result.sent, f"{result.sent - result.in_redis} missing in Redis"
    if mode == "exactly-once":
        assert result.duplicates == 0, f"{result.duplicates} duplicate results"


def test_kill_9_any_stage_mid_stream(
    mode: str,
    topology: str,
    settings: Settings,
    stages: StageProcesses,
    redis_client: redis.Redis,
) -> None:
    stages.start_pipeline()
    load = Load(settings, count=3000, rate=600).start()
    rng = random.Random(7)
    for round_, step in enumerate(["infer", "validate", "persist", "infer"]):
        load.wait_sent((round_ + 1) / 5 + rng.uniform(-0.05, 0.05))
        name = stages.runs(step)
        stages.kill(name)
        stages.start(name)  # same worker slot: fences the killed one's transaction
    load.join()
    _check(ledger(settings, redis_client, load.ids), mode)


def test_stopped_infer_worker_is_fenced_when_it_wakes(
    mode: str,
    topology: str,
    settings: Settings,
    stages: StageProcesses,
    redis_client: redis.Redis,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv(
        "STREAMINFER_KAFKA_CONSUMER_EXTRA",
        '{"session.timeout.ms": 6000, "heartbeat.interval.ms": 1000, "max.poll.interval.ms": 7000}',
    )
    stages.start_pipeline()
    infer = stages.runs("infer")
    stages.start(infer, label=f"{infer}-b", worker_id="b")
    load = Load(settings, count=3000, rate=500).start()
    load.wait_sent(0.3)
    stages.signal(infer, signal.SIGSTOP)
    load.wait_sent(0.8)  # ~3 s; the group evicts it after 6 s and the -b member takes over
    stages.wait_joined(infer, label=f"{infer}-b")
    stages.signal(infer, signal.SIGCONT)
    load.join()
    _check(ledger(settings, redis_client, load.ids), mode)


def test_sigterm_drains_and_restart_reprocesses_nothing(
    mode: str,
    topology: str,
    settings: Settings,
    stages: StageProcesses,
    redis_client: redis.Redis,
) -> None:
    stages.start_pipeline()
    load = Load(settings, count=2000, rate=800).start()
    load.wait_sent(0.5)
    infer = stages.runs("infer")
    assert stages.terminate(infer) == 0
    stages.start(infer)
    load.join()
    result = ledger(settings, redis_client, load.ids)
    _check(result, mode)
    assert result.duplicates == 0  # a clean shutdown commits: nothing replayed in either mode


def test_scale_infer_1_3_1_under_load(
    mode: str,
    topology: str,
    settings: Settings,
    stages: StageProcesses,
    redis_client: redis.Redis,
) -> None:
    stages.start_pipeline()
    load = Load(settings, count=3000, rate=600).start()
    load.wait_sent(0.25)
    infer = stages.runs("infer")
    stages.start(infer, label=f"{infer}-b", worker_id="b", wait=False)
    stages.start(infer, label=f"{infer}-c", worker_id="c", wait=False)
    stages.wait_members(infer, 3)
    load.wait_sent(0.6)
    assert stages.terminate(f"{infer}-b") == 0
    assert stages.terminate(f"{infer}-c") == 0
    load.join()
    _check(ledger(settings, redis_client, load.ids), mode)


def test_redis_down_for_10s_pauses_persist_then_resumes(
    mode: str,
    topology: str,
    settings: Settings,
    stages: StageProcesses,
    redis_client: redis.Redis,
) -> None:
    if not REDIS.managed(settings):
        pytest.skip("REDIS_URL points at a Redis this test must not stop")
    stages.start_pipeline()
    load = Load(settings, count=2000, rate=150).start()  # ~13 s of traffic
    load.wait_sent(0.15)
    REDIS.stop(settings)
    load.wait_sent(0.9)  # ~10 s with Redis down
    REDIS.start(settings)
    load.join()
    _check(ledger(settings, redis_client, load.ids), mode)


@pytest.mark.timeout(480)
def test_broker_restart_under_load(
    mode: str,
    topology: str,
    settings: Settings,
    stages: StageProcesses,
    redis_client: redis.Redis,
) -> None:
    if not KAFKA.managed(settings):
        pytest.skip("KAFKA_BOOTSTRAP_SERVERS points at a broker this test must not stop")
    stages.start_pipeline()
    load = Load(settings, count=2000, rate=200).start()
    load.wait_sent(0.3)
    KAFKA.stop(settings)
    KAFKA.start(settings)
    load.join()
    keys = [
        ResultKeys(settings.kafka.topic_prefix).key(settings.kafka.default_tenant, i)
        for i in load.ids
    ]
    restarted: list[str] = []

    def supervised_until_stored() -> bool:
        # Be the supervisor compose or k8s would be: after the broker restart, librdkafka can
        # block in send_offsets_to_transaction (librdkafka #5456/#5511); the committer's
        # watchdog then exits the stage with 75, and a restarted worker fences it and resumes.
        for name in stages.pipeline:
            if stages.procs[name].poll() == EXIT_STUCK:
                restarted.append(name)
                stages.start(name, wait=False)
        return sum(v is not None for v in redis_client.mget(keys)) == len(keys)

    wait_until(supervised_until_stored, 400, "every result is stored, restarting stuck stages")
    _check(ledger(settings, redis_client, load.ids, timeout_s=60), mode)


def test_poison_records_go_to_the_dlq_with_their_offsets(
    mode: str,
    topology: str,
    settings: Settings,
    stages: StageProcesses,
    redis_client: redis.Redis,
) -> None:
    stages.start_pipeline()
    features, _ = holdout()
    poison = {
        "not-msgpack": b"\xc1\xc1\xc1",
        "huge": encode_raw(
            {
                "id": "h",
                "model": "digits",
                "created_at": 1.0,
                "inputs": {"input": {"dtype": "float32", "shape": [64], "data": b"\x00" * 900_000}},
            }
        ),
        "wrong-types": encode_raw({"id": ["x"], "model": 3, "inputs": "no", "created_at": "t"}),
    }
    producer: Producer = make_producer(settings, **{"message.max.bytes": 2_000_000})
    good_ids = []
    offsets: dict[str, int] = {}

    def remember(_err: KafkaError | None, msg: Message) -> None:
        offsets[(msg.key() or b"").decode()] = msg.offset() or 0

    for i in range(300):
        request_id = f"ok-{i}"
        good_ids.append(request_id)
        value = REQUESTS.encode(digits_request(features[i % len(features)], request_id=request_id))
        producer.produce(settings.topics.requests, key=request_id.encode(), value=value)
        if i % 10 == 0:
            kind = list(poison)[(i // 10) % len(poison)]
            producer.produce(
                settings.topics.requests,
                key=f"{kind}-{i}".encode(),
                value=poison[kind],
                on_delivery=remember,
            )
    assert producer.flush(30) == 0
    dlq = read_topic(settings, settings.topics.dlq, count=len(offsets))
    assert len(dlq) == len(offsets)
    for message in dlq:
        headers = dict(message.headers() or [])
        key = (message.key() or b"").decode()
        assert int(headers["dlq.source.offset"]) == offsets[key]
        assert headers["dlq.reason"] == b"malformed"
        assert message.value() == poison[key.rsplit("-", 1)[0]]
    _check(ledger(settings, redis_client, good_ids), mode)

"""The fused topology end to end on the real broker and Redis, in both guarantees: one
``stage fused`` process turns requests into results, Redis values and stored notices, writes
nothing to ``inference.validated``, dead-letters bad requests as validate would, and commits
every input offset."""

from __future__ import annotations

import uuid
from collections import Counter
from collections.abc import Iterator

import onnxruntime as ort
import pytest
import redis
from confluent_kafka import Producer

from kafkaio.offsets import group_backlog
from schemas import Codec, ResultV1, StoredV1, tensor_from_array
from schemas.keys import ResultKeys
from streaminfer.kafka import make_consumer, make_producer
from streaminfer.settings import Settings
from tests.fixtures import StageProcesses, read_topic, records_written, wait_until
from tests.helpers import MODELS, REQUESTS, digits_request, encode_raw, holdout

pytestmark = pytest.mark.integration
RESULTS = Codec(ResultV1)


@pytest.fixture(params=["exactly-once", "at-least-once"])
def mode(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    monkeypatch.setenv("STREAMINFER_PROCESSING_GUARANTEE", request.param)
    monkeypatch.setenv("STREAMINFER_STAGE_TOPOLOGY", "fused")
    yield request.param


def _bad_requests() -> dict[str, tuple[bytes, str]]:
    """Kind -> (value, the reason validate gives it)."""
    features, _ = holdout()
    return {
        "malformed": (b"\xc1 this is not msgpack", "malformed"),
        "wrong_types": (
            encode_raw({"id": 5, "model": "digits", "inputs": {}, "created_at": 1}),
            "malformed",
        ),
        "unknown_model": (
            REQUESTS.encode(digits_request(features[0], model="cats")),
            "unknown_model",
        ),
        "wrong_shape": (
            REQUESTS.encode(
                digits_request(features[0], inputs={"input": tensor_from_array(features[:2])})
            ),
            "signature_mismatch",
        ),
    }


def _send(settings: Settings, values: list[tuple[bytes, bytes]]) -> dict[bytes, int]:
    """Produce (key, value) pairs to inference.requests; returns each key's offset."""
    producer: Producer = make_producer(settings)
    offsets: dict[bytes, int] = {}
    for key, value in values:
        producer.produce(
            settings.topics.requests,
            key=key,
            value=value,
            on_delivery=lambda _err, msg: offsets.__setitem__(msg.key(), msg.offset()),
        )
    assert producer.flush(30) == 0
    return offsets


def test_fused_serves_each_request_once_and_dead_letters_like_validate(
    mode: str, settings: Settings, stages: StageProcesses, redis_client: redis.Redis
) -> None:
    stages.start_pipeline()
    assert stages.pipeline == ("fused",)
    features, _ = holdout()
    bad = _bad_requests()
    values: list[tuple[bytes, bytes]] = []
    good_ids = [f"good-{i}-{uuid.uuid4().hex[:6]}" for i in range(len(features))]
    for i, request_id in enumerate(good_ids):
        values.append(
            (
                request_id.encode(),
                REQUESTS.encode(digits_request(features[i], request_id=request_id)),
            )
        )
        if i % 9 == 0:
            kind = list(bad)[(i // 9) % len(bad)]
            values.append((f"{kind}-{i}".encode(), bad[kind][0]))
    offsets = _send(settings, values)
    dead_keys = [k for k, _ in values if not k.startswith(b"good-")]

    stored = read_topic(settings, settings.topics.stored, count=len(good_ids))
    assert sorted(Codec(StoredV1).decode(m.value()).id for m in stored) == sorted(good_ids)
    results = read_topic(settings, settings.topics.results, count=len(good_ids))
    assert Counter(RESULTS.decode(m.value()).id for m in results) == Counter(good_ids)

    direct = ort.InferenceSession(str(MODELS / "digits" / "1" / "model.onnx"))
    labels, _ = direct.run(None, {"input": features})
    keys = [
        ResultKeys(settings.kafka.topic_prefix).key(settings.kafka.default_tenant, i)
        for i in good_ids
    ]
    for i, value in enumerate(redis_client.mget(keys)):
        assert value is not None, f"{good_ids[i]} missing from Redis"
        assert RESULTS.decode(value).label == str(labels[i])

    dlq = read_topic(settings, settings.topics.dlq, count=len(dead_keys))
    assert sorted(m.key() for m in dlq) == sorted(dead_keys)
    for message in dlq:
        headers = dict(message.headers() or [])
        kind = message.key().decode().rsplit("-", 1)[0]
        assert headers["dlq.stage"] == b"validate"
        assert headers["dlq.reason"].decode() == bad[kind][1]
        assert headers["dlq.source.topic"].decode() == settings.topics.requests
        assert int(headers["dlq.source.offset"]) == offsets[message.key()]
        assert message.value() == bad[kind][0]

    assert records_written(settings, settings.topics.validated) == 0, "no intermediate topic"
    reader = make_consumer(settings, group_id=settings.group_id("fused"))
    try:
        wait_until(
            lambda: sum(group_backlog(reader, settings.topics.requests).values()) == 0,
            30,
            "the fused group committed every input offset",
        )
    finally:
        reader.close()

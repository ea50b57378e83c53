"""validate -> infer -> persist on the real broker and Redis."""

from __future__ import annotations

import uuid
from collections import Counter

import numpy as np
import onnxruntime as ort
import pytest
import redis
from confluent_kafka import Producer

from kafkaio.produce import RequestProducer
from schemas import Codec, ResultV1, StoredV1, tensor_from_array, tensor_to_array
from schemas.keys import ResultKeys
from streaminfer.kafka import make_admin, make_producer
from streaminfer.settings import Settings
from tests.fixtures import StageProcesses, read_topic, send_digits
from tests.helpers import MODELS, REQUESTS, digits_request, encode_raw, holdout

pytestmark = pytest.mark.integration
RESULTS = Codec(ResultV1)


def _send(settings: Settings, values: list[tuple[bytes, bytes]]) -> None:
    """Produce raw (key, value) pairs to inference.requests and wait for every ack."""
    producer: Producer = make_producer(settings)
    for key, value in values:
        producer.produce(settings.topics.requests, key=key, value=value)
    assert producer.flush(30) == 0


def test_every_request_gets_exactly_the_models_answer(
    settings: Settings, stages: StageProcesses, redis_client: redis.Redis
) -> None:
    stages.start_pipeline()
    features, _ = holdout()
    sender = RequestProducer(producer=make_producer(settings), topic=settings.topics.requests)
    ids = [f"req-{i}-{uuid.uuid4().hex[:6]}" for i in range(len(features))]
    for request_id, x in zip(ids, features, strict=True):
        sender.send(digits_request(x, request_id=request_id))
    assert sender.flush() == 0

    stored = read_topic(settings, settings.topics.stored, count=len(ids))
    notices = [Codec(StoredV1).decode(m.value()) for m in stored]
    assert sorted(n.id for n in notices) == sorted(ids)

    results = read_topic(settings, settings.topics.results, count=len(ids))
    assert Counter(RESULTS.decode(m.value()).id for m in results) == Counter(ids)

    direct = ort.InferenceSession(str(MODELS / "digits" / "1" / "model.onnx"))
    labels, probabilities = direct.run(None, {"input": features})
    keys = [
        ResultKeys(settings.kafka.topic_prefix).key(settings.kafka.default_tenant, i) for i in ids
    ]
    for i, value in enumerate(redis_client.mget(keys)):
        assert value is not None, f"{ids[i]} missing from Redis"
        result = RESULTS.decode(value)
        assert result.id == ids[i]
        assert result.label == str(labels[i])
        np.testing.assert_allclose(
            tensor_to_array(result.outputs["probabilities"]), probabilities[i], rtol=1e-6
        )
        assert 0 < redis_client.ttl(keys[i]) <= settings.redis.result_ttl_s


def test_bad_records_go_to_the_dlq_and_never_block_good_ones(
    settings: Settings, stages: StageProcesses, redis_client: redis.Redis
) -> None:
    stages.start_pipeline()
    features, _ = holdout()
    bad = {
        "malformed": b"\xc1 this is not msgpack",
        "wrong_types": encode_raw({"id": 5, "model": "digits", "inputs": {}, "created_at": 1}),
        "unknown_model": REQUESTS.encode(digits_request(features[0], model="cats")),
        "wrong_shape": REQUESTS.encode(
            digits_request(features[0], inputs={"input": tensor_from_array(features[:2])})
        ),
    }
    expected_reason = {
        "malformed": "malformed",
        "wrong_types": "malformed",
        "unknown_model": "unknown_model",
        "wrong_shape": "signature_mismatch",
    }
    values: list[tuple[bytes, bytes]] = []
    good_ids = []
    for i in range(40):
        request_id = f"good-{i}"
        good_ids.append(request_id)
        values.append(
            (
                request_id.encode(),
                REQUESTS.encode(digits_request(features[i], request_id=request_id)),
            )
        )
        kind = list(bad)[i % len(bad)]
        values.append((f"{kind}-{i}".encode(), bad[kind]))
    _send(settings, values)

    dlq = read_topic(settings, settings.topics.dlq, count=40)
    assert len(dlq) == 40
    for message in dlq:
        headers = dict(message.headers() or [])
        kind = message.key().decode().rsplit("-", 1)[0]
        assert headers["dlq.reason"].decode() == expected_reason[kind], headers
        assert headers["dlq.stage"] == b"validate"
        assert headers["dlq.source.topic"].decode() == settings.topics.requests
        assert int(headers["dlq.source.offset"]) >= 0
        assert headers["dlq.error"]
        assert message.value() == bad[kind]  # original bytes untouched

    read_topic(settings, settings.topics.stored, count=len(good_ids))
    keys = [
        ResultKeys(settings.kafka.topic_prefix).key(settings.kafka.default_tenant, i)
        for i in good_ids
    ]
    assert all(v is not None for v in redis_client.mget(keys))


def test_two_infer_workers_share_the_partitions_and_produce_each_result_once(
    settings: Settings, stages: StageProcesses
) -> None:
    stages.start("validate")
    stages.start("infer", workers=2)
    stages.wait_members("infer", 2)

    ids = [f"w-{i}" for i in range(1000)]
    send_digits(settings, settings.topics.requests, ids)

    results = read_topic(settings, settings.topics.results, count=len(ids))
    assert Counter(RESULTS.decode(m.value()).id for m in results) == Counter(ids)


def test_two_validate_workers_each_own_part_of_the_live_topic(
    settings: Settings, stages: StageProcesses
) -> None:
    # validate reads two topics; the sticky assignor gave one member all of the live topic
    # and the other all of the backfill topic, so a second worker served no live request.
    stages.start("validate", workers=2)
    stages.wait_members("validate", 2)
    admin = make_admin(settings)
    group = settings.group_id("validate")
    description = admin.describe_consumer_groups([group])[group].result(timeout=10)
    live = [
        {
            tp.partition
            for tp in m.assignment.topic_partitions
            if tp.topic == settings.topics.requests
        }
        for m in description.members
    ]
    assert all(live), f"a validate member owns no live partition: {live}"
    assert set().union(*live) == set(range(settings.kafka.topic_partitions))

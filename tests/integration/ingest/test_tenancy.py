"""Tenancy on the real stack: two API keys of two tenants, and a Kafka producer without one.

One tenant can neither read, overwrite nor settle (make answer 422) another's request, even
when both use the same id; records produced straight to Kafka belong to the default tenant.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import numpy as np
import pytest
import redis
from pydantic import SecretStr

from schemas import Codec, RequestV1, tensor_from_array
from schemas.keys import ResultKeys
from streaminfer.kafka import make_producer
from streaminfer.settings import Settings
from tests.fixtures import StageProcesses, read_topic, records_written, wait_until
from tests.integration.ingest.fixtures import DIGITS_PIXELS, digits_body, serving

pytestmark = pytest.mark.integration
ACME = {"X-API-Key": "key-acme"}
GLOBEX = {"Authorization": "Bearer key-globex"}
TRUSTED = {"X-API-Key": "key-bare"}  # a bare key: the default tenant's
KEYS = SecretStr("acme=key-acme, globex=key-globex, key-bare")


def start_pipeline(stages: StageProcesses) -> None:
    for name in ("validate", "infer", "persist"):
        stages.start(name)


@pytest.fixture()
def api(settings: Settings) -> Iterator[httpx.Client]:
    # Model checks off: a request with an expired deadline reaches Kafka, and the validate
    # stage dead-letters it (the path a dead letter takes back to predict's waiters).
    # A long predict limit: one test waits while the stages start.
    changes = {"api_keys": KEYS, "check_models": False, "predict_max_timeout_s": 120.0}
    with serving(settings, ingest=changes) as client:
        yield client


def who(response: httpx.Response) -> str:
    assert response.status_code == 200, response.text
    return str(response.json()["attributes"]["who"])


def test_a_tenant_can_neither_read_nor_overwrite_another_tenants_result(
    settings: Settings, api: httpx.Client, stages: StageProcesses, redis_client: redis.Redis
) -> None:
    start_pipeline(stages)
    body = digits_body("shared-1", attributes={"who": "acme"})
    assert who(api.post("/v1/predict", params={"timeout": 20}, json=body, headers=ACME)) == "acme"
    assert api.get("/v1/results/shared-1", headers=GLOBEX).status_code == 404
    assert api.get("/v1/results/shared-1", headers=TRUSTED).status_code == 404

    # globex reuses the id: it gets a result of its own, acme's stays as it was.
    body = digits_body("shared-1", attributes={"who": "globex"})
    answer = api.post("/v1/predict", params={"timeout": 20}, json=body, headers=GLOBEX)
    assert who(answer) == "globex"
    assert who(api.get("/v1/results/shared-1", headers=ACME)) == "acme"
    assert who(api.get("/v1/results/shared-1", headers=GLOBEX)) == "globex"
    keys = ResultKeys(settings.kafka.topic_prefix)
    stored = {k.decode() for k in redis_client.keys(f"{settings.kafka.topic_prefix}result:*")}
    assert stored == {keys.key("acme", "shared-1"), keys.key("globex", "shared-1")}


def test_records_produced_straight_to_kafka_are_the_default_tenants(
    settings: Settings, api: httpx.Client, stages: StageProcesses
) -> None:
    start_pipeline(stages)
    request = RequestV1(
        id="direct-1",
        model="digits",
        inputs={"input": tensor_from_array(np.array(DIGITS_PIXELS, dtype=np.float32))},
        created_at=time.time(),
    )
    producer = make_producer(settings)
    producer.produce(
        settings.topics.requests, key=b"direct-1", value=Codec(RequestV1).encode(request)
    )
    assert producer.flush(30) == 0
    read_topic(settings, settings.topics.stored, count=1)
    assert api.get("/v1/results/direct-1", headers=TRUSTED).status_code == 200
    assert api.get("/v1/results/direct-1", headers=ACME).status_code == 404


def test_another_tenants_dead_letter_does_not_settle_a_predict(
    settings: Settings, api: httpx.Client, stages: StageProcesses
) -> None:
    # globex's request with acme's id and an expired deadline is in Kafka first: on the same
    # partition (same key), so validate dead-letters it before it serves acme's request.
    expired = digits_body("contested-1", deadline=time.time() - 60)
    assert api.post("/v1/requests", json=expired, headers=GLOBEX).status_code == 202
    answers: dict[str, Any] = {}

    def predict() -> None:
        body = digits_body("contested-1", attributes={"who": "acme"})
        answers["acme"] = api.post(
            "/v1/predict", params={"timeout": 90}, json=body, headers=ACME, timeout=120
        )

    waiting = threading.Thread(target=predict)
    waiting.start()
    try:
        # acme's request is produced only once its waiter is subscribed: from then on, any
        # outcome for the id can reach it.
        wait_until(lambda: records_written(settings, settings.topics.requests) == 2, 30, "2 sent")
        start_pipeline(stages)
    finally:
        waiting.join(timeout=120)
    assert not waiting.is_alive(), "predict did not return"
    assert who(answers["acme"]) == "acme"
    (dead,) = read_topic(settings, settings.topics.dlq, count=1)
    headers = dict(dead.headers() or [])
    assert (headers["dlq.reason"], headers["streaminfer.tenant"]) == (b"expired", b"globex")
    assert api.get("/v1/results/contested-1", headers=GLOBEX).status_code == 404

"""The HTTP API on a real uvicorn server, with the real broker, Redis and stages."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote

import httpx
import msgspec
import numpy as np
import onnxruntime as ort
import pytest
import redis
from hypothesis import HealthCheck, event, given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st
from pydantic import SecretStr

from ingest.rendering import result_json
from schemas import Codec, RequestV1, ResultV1, StoredV1, tensor_from_array, tensor_to_array
from schemas.keys import ResultKeys
from streaminfer.kafka import make_producer
from streaminfer.settings import Settings
from tests.fixtures import StageProcesses, read_topic, records_written, wait_until
from tests.helpers import MODELS, REPO
from tests.integration.ingest.fixtures import (
    DIGITS_PIXELS,
    digits_body,
    refused_port,
    serving,
)

pytestmark = pytest.mark.integration
REQUESTS = Codec(RequestV1)
RESULTS = Codec(ResultV1)


@pytest.fixture()
def api(settings: Settings) -> Iterator[httpx.Client]:
    with serving(settings) as client:
        yield client


def model_label(pixels: list[float]) -> str:
    session = ort.InferenceSession(str(MODELS / "digits" / "1" / "model.onnx"))
    labels, _ = session.run(None, {"input": np.array([pixels], dtype=np.float32)})
    return str(labels[0])


def test_single_request_is_in_kafka_when_202(settings: Settings, api: httpx.Client) -> None:
    response = api.post("/v1/requests", json=digits_body("one-1"))
    assert response.status_code == 202, response.text
    assert response.json() == {"ids": ["one-1"]}
    (record,) = read_topic(settings, settings.topics.requests, count=1)
    request = REQUESTS.decode(record.value())
    assert (request.id, record.key()) == ("one-1", b"one-1")
    assert dict(record.headers())["schema"] == b"inference.request/1"
    np.testing.assert_array_equal(tensor_to_array(request.inputs["input"]), DIGITS_PIXELS)


def test_batch_returns_every_id_and_kafka_holds_every_record(
    settings: Settings, api: httpx.Client
) -> None:
    body = [digits_body(f"b-{i}", key=f"customer-{i % 7}") for i in range(100)]
    body.append(digits_body())  # no id: the API makes one
    response = api.post("/v1/requests", json=body)
    assert response.status_code == 202, response.text
    ids = response.json()["ids"]
    assert ids[:100] == [f"b-{i}" for i in range(100)] and len(ids) == 101
    records = read_topic(settings, settings.topics.requests, count=101)
    keys = {REQUESTS.decode(r.value()).id: r.key() for r in records}
    assert set(keys) == set(ids)
    assert keys["b-8"] == b"customer-1"
    assert keys[ids[100]] == ids[100].encode()


def test_msgpack_body(settings: Settings, api: httpx.Client) -> None:
    tensor = tensor_from_array(np.array(DIGITS_PIXELS, dtype=np.float32))
    body = [
        {"id": f"mp-{i}", "model": "digits", "inputs": {"input": msgspec.to_builtins(tensor)}}
        for i in range(3)
    ]
    body[0]["inputs"]["input"]["data"] = tensor.data  # bin, as a MessagePack producer sends it
    response = api.post(
        "/v1/requests",
        content=msgspec.msgpack.encode(body),
        headers={"content-type": "application/msgpack"},
    )
    assert response.status_code == 202, response.text
    records = read_topic(settings, settings.topics.requests, count=3)
    decoded = sorted((REQUESTS.decode(r.value()) for r in records), key=lambda r: r.id)
    assert [r.id for r in decoded] == ["mp-0", "mp-1", "mp-2"]
    assert all(r.inputs["input"].data == tensor.data for r in decoded)


def test_invalid_requests_get_422_with_paths_and_nothing_reaches_kafka(
    settings: Settings, api: httpx.Client
) -> None:
    body = [
        digits_body("ok-0"),
        digits_body("bad-1", inputs={"input": DIGITS_PIXELS[:8]}),
        {"id": "bad-2", "inputs": {}},
    ]
    response = api.post("/v1/requests", json=body)
    assert response.status_code == 422
    errors = [(e["path"], e["reason"]) for e in response.json()["errors"]]
    assert errors == [("$[1].inputs.input", "signature_mismatch"), ("$[2]", "malformed")]
    assert "model" in response.json()["errors"][1]["message"]
    assert records_written(settings, settings.topics.requests) == 0


def test_413_for_a_large_body_or_batch_and_429_when_the_queue_is_full(
    settings: Settings,
) -> None:
    with serving(
        settings,
        ingest={"max_body_bytes": 4000, "max_batch_records": 3, "queue_max_records": 8},
    ) as client:
        big = client.post("/v1/requests", json=[digits_body()] * 30)
        assert big.status_code == 413 and big.json()["error"] == "body_too_large"
        many = client.post("/v1/requests", json=[{"model": "digits", "inputs": {}}] * 4)
        assert many.status_code == 413 and many.json()["error"] == "batch_too_large"
    with serving(settings, ingest={"queue_max_records": 2}) as client:
        full = client.post("/v1/requests", json=[digits_body(f"q-{i}") for i in range(3)])
        assert full.status_code == 429
        assert full.headers["retry-after"] == str(settings.ingest.busy_retry_after_s)
    assert records_written(settings, settings.topics.requests) == 0


def test_api_keys(settings: Settings) -> None:
    with serving(settings, ingest={"api_keys": SecretStr("alpha, beta")}) as client:
        assert client.post("/v1/requests", json=digits_body()).status_code == 401
        wrong = client.post("/v1/requests", json=digits_body(), headers={"X-API-Key": "gamma"})
        assert wrong.status_code == 403
        right = client.post("/v1/requests", json=digits_body(), headers={"X-API-Key": "beta"})
        assert right.status_code == 202
        bearer = client.get("/v1/results/x", headers={"Authorization": "Bearer alpha"})
        assert bearer.status_code == 404
        assert client.get("/metrics").status_code == 401
        assert client.get("/openapi.json").status_code == 401
        assert client.get("/healthz").status_code == 200
        assert client.get("/readyz").status_code == 200


def test_readyz_fails_when_redis_is_unreachable(settings: Settings) -> None:
    with (
        refused_port() as port,
        serving(settings, redis={"url": SecretStr(f"redis://127.0.0.1:{port}/0")}) as client,
    ):
        ready = client.get("/readyz")
        assert ready.status_code == 503
        assert ready.json()["kafka"] == "ok" and ready.json()["redis"] != "ok"
        assert client.get("/healthz").status_code == 200
        lookup = client.get("/v1/results/anything")
        assert lookup.status_code == 503 and "retry-after" in lookup.headers


def test_503_not_202_when_kafka_is_unreachable(settings: Settings) -> None:
    with (
        refused_port() as port,
        serving(
            settings,
            kafka={"bootstrap_servers": f"127.0.0.1:{port}"},
            ingest={"delivery_timeout_s": 1.0},
        ) as client,
    ):
        started = time.monotonic()
        response = client.post("/v1/requests", json=[digits_body("k-1"), digits_body("k-2")])
        assert response.status_code == 503, response.text
        assert response.headers["retry-after"] == str(settings.ingest.unavailable_retry_after_s)
        assert response.json()["acknowledged"] == []
        assert sorted(response.json()["failed"]) == ["k-1", "k-2"]
        assert time.monotonic() - started < 10
        assert client.get("/readyz").json()["kafka"] != "ok"


def test_predict_round_trip_and_504_then_fetchable(
    settings: Settings, api: httpx.Client, stages: StageProcesses
) -> None:
    late = api.post("/v1/predict", params={"timeout": 0.2}, json=digits_body("late-1"))
    assert late.status_code == 504 and late.json()["id"] == "late-1"
    stages.start_pipeline()
    wait_until(lambda: api.get("/v1/results/late-1").status_code == 200, 60, "late-1 stored")

    # An id with a slash: still one path parameter for the lookup.
    response = api.post("/v1/predict", params={"timeout": 10}, json=digits_body("pr/1"))
    assert response.status_code == 200, response.text
    result = response.json()
    assert result["id"] == "pr/1" and result["label"] == model_label(DIGITS_PIXELS)
    assert result["outputs"]["probabilities"]["shape"] == [10]
    assert api.get("/v1/results/pr/1").json() == result
    packed = api.get("/v1/results/pr/1", headers={"accept": "application/msgpack"})
    assert result_json(packed.content) == result
    assert RESULTS.decode(packed.content).id == "pr/1"


def test_predict_answers_422_with_the_dlq_reason(
    settings: Settings, stages: StageProcesses
) -> None:
    stages.start_pipeline()
    # With the model check off the request reaches Kafka and the validate stage rejects it.
    with serving(settings, ingest={"check_models": False}) as client:
        body = digits_body("dead-1", model="cats")
        response = client.post("/v1/predict", params={"timeout": 20}, json=body)
    assert response.status_code == 422, response.text
    answer = response.json()
    assert (answer["error"], answer["reason"], answer["stage"]) == (
        "dead_lettered",
        "unknown_model",
        "validate",
    )
    assert answer["id"] == "dead-1"


def test_same_id_twice_yields_one_result(
    settings: Settings, api: httpx.Client, stages: StageProcesses, redis_client: redis.Redis
) -> None:
    stages.start_pipeline()
    for _ in range(2):
        assert api.post("/v1/requests", json=digits_body("twice-1")).status_code == 202
    notices = read_topic(settings, settings.topics.stored, count=2)
    assert [Codec(StoredV1).decode(n.value()).id for n in notices] == ["twice-1", "twice-1"]
    keys = redis_client.keys(f"{settings.kafka.topic_prefix}result:*")
    stored = ResultKeys(settings.kafka.topic_prefix).key(settings.kafka.default_tenant, "twice-1")
    assert keys == [stored.encode()]


def test_metrics_count_requests_and_records(api: httpx.Client) -> None:
    api.post("/v1/requests", json=[digits_body(), digits_body()])
    api.post("/v1/requests", json={"model": 1})
    text = api.get("/metrics").text
    assert (
        'streaminfer_http_requests_total{method="POST",route="/v1/requests",status="202"} 1.0'
        in text
    )
    assert (
        'streaminfer_http_requests_total{method="POST",route="/v1/requests",status="422"} 1.0'
        in text
    )
    assert 'streaminfer_records_produced_total{stage="ingest"} 2.0' in text
    assert "streaminfer_producer_queue_records " in text
    assert "streaminfer_http_request_duration_seconds_bucket" in text


def test_docs_and_openapi_are_served(api: httpx.Client) -> None:
    assert "swagger" in api.get("/docs").text.lower()
    assert "/v1/predict" in api.get("/openapi.json").json()["paths"]


def test_cli_produce_and_results(settings: Settings, tmp_path: Path) -> None:
    lines = [
        msgspec.json.encode(digits_body("cli-1")).decode(),
        msgspec.json.encode(digits_body("cli-2", key="k")).decode(),
        '{"model": "digits", "inputs": {"input": [1, 2]}}',
    ]
    source = tmp_path / "requests.jsonl"
    source.write_text("\n".join(lines) + "\n")
    produce = cli("produce", str(source))
    assert produce.returncode == 1  # one line was invalid
    assert "sent 2, acknowledged 2" in produce.stderr and "line 3" in produce.stderr
    records = read_topic(settings, settings.topics.requests, count=2)
    assert sorted(REQUESTS.decode(r.value()).id for r in records) == ["cli-1", "cli-2"]

    producer = make_producer(settings)
    for request_id in ("res-1", "res-2"):
        producer.produce(settings.topics.results, value=RESULTS.encode(fake_result(request_id)))
    assert producer.flush(30) == 0
    results = cli("results")
    assert results.returncode == 0, results.stderr
    printed = [msgspec.json.decode(line) for line in results.stdout.splitlines()]
    assert sorted(p["id"] for p in printed) == ["res-1", "res-2"]
    assert printed[0]["outputs"]["probabilities"]["values"] == [0.5, 0.5]


def test_streaminfer_ingest_command_serves_with_two_workers(settings: Settings) -> None:
    with refused_port() as port:
        pass  # free again: the server binds it (a tiny race with other processes, accepted)
    proc = subprocess.Popen(
        [sys.executable, "-m", "streaminfer.cli", "ingest", "--port", str(port), "--workers", "2"],
        cwd=REPO,
        env=os.environ.copy(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_until(lambda: healthy(f"http://127.0.0.1:{port}"), 60, "ingest answered /healthz")
        response = httpx.post(f"http://127.0.0.1:{port}/v1/requests", json=digits_body("w2-1"))
        assert response.status_code == 202
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0


def healthy(url: str) -> bool:
    try:
        return httpx.get(f"{url}/healthz", timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "streaminfer.cli", *args],
        cwd=REPO,
        env=os.environ.copy(),
        capture_output=True,
        text=True,
        timeout=120,
    )


def fake_result(request_id: str) -> ResultV1:
    return ResultV1(
        id=request_id,
        model="digits",
        model_version="1",
        status="ok",
        outputs={"probabilities": tensor_from_array(np.array([0.5, 0.5], dtype=np.float32))},
        created_at=time.time(),
    )


# --- no input produces a 5xx ------------------------------------------------------------

_int64 = st.integers(-(2**63), 2**63 - 1)  # what MessagePack can carry
_json = st.recursive(
    st.none() | st.booleans() | _int64 | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4)
    ),
    max_leaves=12,
)
_tensor = st.one_of(
    st.lists(st.floats(allow_nan=False, width=32) | st.integers(-5, 20), max_size=70),
    st.fixed_dictionaries(
        {"values": st.lists(st.floats(0, 16, width=32), min_size=60, max_size=66)},
        optional={
            "dtype": st.sampled_from(["float32", "float64", "int8", "uint8", "bool", "x"]),
            "shape": st.lists(st.integers(-1, 70), max_size=2),
        },
    ),
    st.fixed_dictionaries(
        {
            "dtype": st.sampled_from(["float32", "int64"]),
            "shape": st.lists(st.integers(0, 64), max_size=2),
            "data": st.binary(max_size=300) | st.text(max_size=20),
        }
    ),
    _json,
)
_request = st.fixed_dictionaries(
    {},
    optional={
        "id": st.text(max_size=300) | _int64 | st.none(),
        "model": st.sampled_from(["digits", "cats", "", "a/b"]) | _json,
        "model_version": st.sampled_from(["1", "2"]) | _json,
        "inputs": st.dictionaries(st.sampled_from(["input", "other"]), _tensor, max_size=2) | _json,
        "created_at": st.floats(allow_nan=False) | _json,
        "deadline": st.floats(allow_nan=False) | st.none(),
        "attributes": st.dictionaries(st.text(max_size=4), st.text(max_size=4)) | _json,
        "key": st.text(max_size=300) | _json,
    },
)
_valid = st.fixed_dictionaries(
    {
        "model": st.just("digits"),
        "inputs": st.fixed_dictionaries(
            {"input": st.lists(st.floats(0, 16, width=32), min_size=64, max_size=64)}
        ),
    },
    optional={
        "id": st.text(min_size=1, max_size=40),
        "key": st.text(min_size=1, max_size=20),
        "attributes": st.dictionaries(st.text(max_size=4), st.text(max_size=4), max_size=2),
    },
)
_body = st.one_of(_valid, _request, st.lists(_valid | _request, max_size=3), _json)
_encoding = st.sampled_from(["application/json", "application/msgpack", "text/plain", None])


@hypothesis_settings(
    max_examples=300,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    route=st.sampled_from(["/v1/requests", "/v1/predict?timeout=5", "/v1/predict?timeout=-1"]),
    body=_body,
    content_type=_encoding,
    raw=st.none() | st.binary(max_size=64),
)
def test_no_input_produces_a_5xx(
    pipeline_api: httpx.Client,
    route: str,
    body: object,
    content_type: str | None,
    raw: bytes | None,
) -> None:
    if raw is not None:
        content = raw
    elif content_type == "application/msgpack":
        content = msgspec.msgpack.encode(body)
    else:
        content = msgspec.json.encode(body)
    headers = {"content-type": content_type} if content_type else {}
    response = pipeline_api.post(route, content=content, headers=headers)
    event(f"{route.split('?')[0]} {response.status_code}")  # --hypothesis-show-statistics
    assert response.status_code < 500, (response.status_code, response.text)
    lookup = pipeline_api.get(f"/v1/results/{quote(str(body)[:50], safe='')}")
    assert lookup.status_code < 500


@pytest.fixture()
def pipeline_api(settings: Settings, stages: StageProcesses) -> Iterator[httpx.Client]:
    """The API with the pipeline behind it: a valid predict gets its 200, not a 504."""
    stages.start_pipeline()
    with serving(settings) as client:
        yield client

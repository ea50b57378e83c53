"""The Open Inference Protocol (KServe v2) doors, HTTP and gRPC, driven by clients nobody here
wrote (tritonclient), on a real uvicorn server with the real broker, Redis and stages."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import httpx
import numpy as np
import pytest
import tritonclient.grpc as triton_grpc
import tritonclient.http as triton_http
from pydantic import SecretStr
from tritonclient.utils import InferenceServerException

from streaminfer.settings import Settings
from tests.fixtures import StageProcesses
from tests.helpers import holdout
from tests.integration.ingest.fixtures import IngestServer

pytestmark = [pytest.mark.integration, pytest.mark.grpc]
KEYS = "acme=key-acme,globex=key-globex"


@dataclass
class Doors:
    """One ingest server: its HTTP API and its gRPC door."""

    http: httpx.Client
    http_address: str  # host:port, as tritonclient.http takes it
    grpc_address: str

    def triton_http(self) -> triton_http.InferenceServerClient:
        return triton_http.InferenceServerClient(self.http_address, network_timeout=30)

    def triton_grpc(self) -> triton_grpc.InferenceServerClient:
        return triton_grpc.InferenceServerClient(self.grpc_address)


@pytest.fixture()
def open_doors(settings: Settings) -> Iterator[Doors]:
    with serving_doors(settings.with_changes(ingest={"grpc_port": 0})) as doors:
        yield doors


@contextmanager
def serving_doors(settings: Settings) -> Iterator[Doors]:
    """A fresh ingest server for ``settings`` (gRPC on ``ingest.grpc_port``)."""
    server = IngestServer(settings)
    server.start()
    try:
        address = server.url.removeprefix("http://")
        grpc_port = server.server.config.app.state.grpc_port
        with httpx.Client(base_url=server.url, timeout=30) as client:
            yield Doors(client, address, f"127.0.0.1:{grpc_port}")
    finally:
        server.stop()


def pixels(rows: int) -> np.ndarray:
    x, _ = holdout()
    return x[:rows]


def v1_predict(doors: Doors, row: np.ndarray, **headers: str) -> dict[str, Any]:
    body = {"model": "digits", "model_version": "1", "inputs": {"input": row.tolist()}}
    response = doors.http.post("/v1/predict", params={"timeout": 20}, json=body, headers=headers)
    assert response.status_code == 200, response.text
    result: dict[str, Any] = response.json()
    return result


def triton_input(module: Any, array: np.ndarray, **data_options: bool) -> Any:
    tensor = module.InferInput("input", list(array.shape), "FP32")
    tensor.set_data_from_numpy(array, **data_options)
    return tensor


def test_tritonclient_http_and_grpc_answer_what_v1_predict_answers(
    open_doors: Doors, stages: StageProcesses
) -> None:
    stages.start_pipeline()
    rows = pixels(3)
    expected = [v1_predict(open_doors, row) for row in rows]
    want_probabilities = np.array([r["outputs"]["probabilities"]["values"] for r in expected])
    want_labels = [int(r["label"]) for r in expected]
    # Equal up to float32 rounding: the infer stage runs whatever batch it consumed, and ONNX
    # Runtime's sums may round differently in another batch.
    close = {"rtol": 1e-5, "atol": 1e-7}

    http = open_doors.triton_http()
    assert http.is_server_live() and http.is_server_ready()
    assert http.is_model_ready("digits") and http.is_model_ready("digits", "1")
    assert not http.is_model_ready("cats") and not http.is_model_ready("digits", "9")
    meta = http.get_model_metadata("digits")
    assert (meta["name"], meta["platform"]) == ("digits", "onnxruntime_onnx")
    assert "1" in meta["versions"]
    assert meta["inputs"] == [{"name": "input", "datatype": "FP32", "shape": [-1, 64]}]
    assert {o["name"]: (o["datatype"], o["shape"]) for o in meta["outputs"]} == {
        "label": ("INT64", [-1]),
        "probabilities": ("FP32", [-1, 10]),
    }
    assert http.get_server_metadata()["name"] == "streaminfer"

    # A batch of three in the binary extension (tritonclient's default), answered stacked.
    # Version 1 named, as in v1_predict: the comparison holds whatever the routing says.
    inputs = [triton_input(triton_http, rows)]
    batch = http.infer("digits", inputs, model_version="1", request_id="oip-h")
    assert batch.get_response()["id"] == "oip-h"
    assert batch.get_response()["model_version"] == "1"
    np.testing.assert_allclose(batch.as_numpy("probabilities"), want_probabilities, **close)
    assert batch.as_numpy("label").tolist() == want_labels
    # One row as JSON numbers, one output asked for, as JSON.
    one = http.infer(
        "digits",
        [triton_input(triton_http, rows[:1], binary_data=False)],
        outputs=[triton_http.InferRequestedOutput("probabilities", binary_data=False)],
        model_version="1",
    )
    assert [o["name"] for o in one.get_response()["outputs"]] == ["probabilities"]
    np.testing.assert_allclose(one.as_numpy("probabilities"), want_probabilities[:1], **close)

    grpc = open_doors.triton_grpc()
    assert grpc.is_server_live() and grpc.is_server_ready() and grpc.is_model_ready("digits")
    assert not grpc.is_model_ready("cats")
    grpc_meta = grpc.get_model_metadata("digits", as_json=True)
    assert grpc_meta["inputs"] == [{"name": "input", "datatype": "FP32", "shape": ["-1", "64"]}]
    assert grpc.get_server_metadata().name == "streaminfer"
    inputs = [triton_input(triton_grpc, rows[1:])]
    answer = grpc.infer("digits", inputs, model_version="1", request_id="oip-g")
    response = answer.get_response()
    assert (response.id, response.model_name, response.model_version) == ("oip-g", "digits", "1")
    np.testing.assert_allclose(answer.as_numpy("probabilities"), want_probabilities[1:], **close)
    assert answer.as_numpy("label").tolist() == want_labels[1:]

    # Every row went through Kafka: each is a stored result under its own id.
    assert open_doors.http.get("/v1/results/oip-h/2").json()["label"] == str(want_labels[2])
    assert open_doors.http.get("/v1/results/oip-g/0").json()["label"] == str(want_labels[1])


def test_no_result_in_time_is_504_with_the_id_on_both_doors(open_doors: Doors) -> None:
    # No stages run: the request is in Kafka, its result never comes.
    body = {
        "id": "late-v2",
        "inputs": [{"name": "input", "shape": [1, 64], "datatype": "FP32", "data": [0.0] * 64}],
    }
    response = open_doors.http.post("/v2/models/digits/infer", params={"timeout": 0.3}, json=body)
    assert response.status_code == 504, response.text
    assert response.json()["id"] == "late-v2" and "error" in response.json()

    grpc = open_doors.triton_grpc()
    with pytest.raises(InferenceServerException) as caught:
        # Triton's `timeout` parameter (microseconds) bounds the wait.
        grpc.infer(
            "digits", [triton_input(triton_grpc, pixels(1))], request_id="late-g", timeout=300_000
        )
    assert caught.value.status() == "StatusCode.DEADLINE_EXCEEDED"
    assert "late-g" in caught.value.message()


def test_invalid_requests_are_refused_before_kafka(open_doors: Doors) -> None:
    http = open_doors.triton_http()
    with pytest.raises(InferenceServerException) as caught:
        http.infer("digits", [triton_input(triton_http, np.zeros((1, 63), np.float32))])
    assert "[-1, 64]" in caught.value.message()
    with pytest.raises(InferenceServerException) as caught:
        http.get_model_metadata("cats")
    assert "cats" in caught.value.message()
    grpc = open_doors.triton_grpc()
    with pytest.raises(InferenceServerException) as caught:
        wrong = triton_grpc.InferInput("input", [1, 64], "FP64")
        grpc.infer("digits", [wrong.set_data_from_numpy(np.zeros((1, 64), np.float64))])
    assert caught.value.status() == "StatusCode.INVALID_ARGUMENT"
    assert "FP32" in caught.value.message()
    with pytest.raises(InferenceServerException) as caught:
        grpc.get_model_metadata("cats")
    assert caught.value.status() == "StatusCode.NOT_FOUND"


def test_dead_lettered_request_is_400_with_the_reason(
    settings: Settings, stages: StageProcesses
) -> None:
    stages.start_pipeline()
    # Without the ingest check, pixels above the declared maximum reach the validate stage.
    changed = settings.with_changes(ingest={"grpc_port": 0, "check_models": False})
    with serving_doors(changed) as doors:
        body = {
            "id": "dead-v2",
            "inputs": [
                {"name": "input", "shape": [1, 64], "datatype": "FP32", "data": [99.0] * 64}
            ],
        }
        response = doors.http.post("/v2/models/digits/infer", params={"timeout": 20}, json=body)
        assert response.status_code == 400, response.text
        answer = response.json()
        assert (answer["id"], answer["reason"], answer["stage"]) == (
            "dead-v2",
            "out_of_range",
            "validate",
        )
        grpc = doors.triton_grpc()
        with pytest.raises(InferenceServerException) as caught:
            grpc.infer("digits", [triton_input(triton_grpc, np.full((1, 64), 99, np.float32))])
        assert caught.value.status() == "StatusCode.INVALID_ARGUMENT"
        assert "out_of_range" in caught.value.message()


def test_api_keys_and_tenants_hold_on_both_doors(
    settings: Settings, stages: StageProcesses
) -> None:
    stages.start_pipeline()
    keyed = settings.with_changes(ingest={"grpc_port": 0, "api_keys": SecretStr(KEYS)})
    with serving_doors(keyed) as doors:
        http, grpc = doors.triton_http(), doors.triton_grpc()
        assert http.is_server_live() and grpc.is_server_live()  # probes stay open
        with pytest.raises(InferenceServerException) as caught:
            http.get_model_metadata("digits")
        assert caught.value.status() == "401"
        with pytest.raises(InferenceServerException) as caught:
            grpc.get_model_metadata("digits", headers={"x-api-key": "wrong"})
        assert caught.value.status() == "StatusCode.PERMISSION_DENIED"
        with pytest.raises(InferenceServerException) as caught:
            grpc.get_model_metadata("digits")
        assert caught.value.status() == "StatusCode.UNAUTHENTICATED"

        row = pixels(1)
        acme = {"x-api-key": "key-acme"}
        # A copy: tritonclient.http adds its own headers to the dict it is given.
        http.infer("digits", [triton_input(triton_http, row)], request_id="t-h", headers={**acme})
        bearer = {"authorization": "Bearer key-globex"}
        grpc.infer("digits", [triton_input(triton_grpc, row)], request_id="t-g", headers=bearer)
        # Each result is its tenant's only.
        globex = {"x-api-key": "key-globex"}
        assert doors.http.get("/v1/results/t-h", headers=acme).status_code == 200
        assert doors.http.get("/v1/results/t-h", headers=globex).status_code == 404
        assert doors.http.get("/v1/results/t-g", headers=globex).status_code == 200
        assert doors.http.get("/v1/results/t-g", headers=acme).status_code == 404

"""The Open Inference Protocol mapping without a broker: v2 tensors <-> RequestV1 / ResultV1,
the HTTP binary extension and the gRPC messages, checked against tritonclient's own encoders
and decoders (written by others, so both ends of the wire are not ours)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import msgspec
import numpy as np
import pytest
import tritonclient.grpc as triton_grpc
import tritonclient.http as triton_http
from redis.exceptions import RedisError
from tritonclient.grpc import service_pb2 as triton_pb

from ingest.delivery import Delivery, QueueFull
from ingest.grpc_v2 import grpc_predict_v2_pb2 as pb
from ingest.oip import (
    GRPC_CODES,
    SERVICE_ERRORS,
    InferRequest,
    InputTensor,
    OipError,
    RequestedOutput,
    build_submissions,
    collect_results,
    input_from_data,
    input_from_raw,
    model_metadata,
    model_ready,
    response_from_results,
    service_error,
    split_rows,
)
from ingest.oip_grpc import infer_request_from_proto, infer_response_to_proto
from ingest.oip_http import infer_response, parse_infer_request
from ingest.payloads import BatchTooLarge, RequestDecoder, Submission
from ingest.service import KafkaUnavailable, Overloaded
from ingest.waiters import DeadLettered, ResultsUnavailable, Stored
from schemas import Codec, ResultV1, tensor_from_array, tensor_to_array
from schemas.models import ModelCatalog, ModelSpec, TensorSpec
from tests.helpers import MODELS, holdout

pytestmark = pytest.mark.grpc  # see pyproject's markers

RESULTS = Codec(ResultV1)


@pytest.fixture(scope="module")
def catalog() -> ModelCatalog:
    return ModelCatalog(MODELS)


@pytest.fixture()
def decoder(catalog: ModelCatalog) -> RequestDecoder:
    return RequestDecoder(catalog=catalog, max_batch=100, message_max_bytes=1 << 20)


def digits_rows(n: int) -> np.ndarray:
    return holdout()[0][:n]


def pixels_input(array: np.ndarray) -> InputTensor:
    return InputTensor("input", "FP32", array.shape, array)


def result(request_id: str, probabilities: list[float], version: str = "1") -> ResultV1:
    probs = np.array(probabilities, np.float32)
    return ResultV1(
        id=request_id,
        model="digits",
        model_version=version,
        status="ok",
        outputs={
            "label": tensor_from_array(np.int64(probs.argmax())),
            "probabilities": tensor_from_array(probs),
        },
        created_at=time.time(),
    )


# ---------------------------------------------------------------- models


def test_metadata_comes_from_model_yaml_with_a_variable_batch_dimension(
    catalog: ModelCatalog,
) -> None:
    meta = model_metadata(catalog, "digits", None)
    assert (meta.name, meta.platform) == ("digits", "onnxruntime_onnx")
    assert "1" in meta.versions
    assert [(t.name, t.datatype, t.shape) for t in meta.inputs] == [("input", "FP32", (-1, 64))]
    outputs = {t.name: (t.datatype, t.shape) for t in meta.outputs}
    assert outputs == {"label": ("INT64", (-1,)), "probabilities": ("FP32", (-1, 10))}
    assert model_metadata(catalog, "digits", "1").name == "digits"
    with pytest.raises(OipError) as unknown:
        model_metadata(catalog, "cats", None)
    assert unknown.value.status == 404 and "cats" in unknown.value.message


def test_model_ready_knows_models_and_versions(catalog: ModelCatalog) -> None:
    assert model_ready(catalog, "digits", None) and model_ready(catalog, "digits", "1")
    assert not model_ready(catalog, "digits", "999")
    assert not model_ready(catalog, "cats", None)


# ---------------------------------------------------------------- tensors in


def test_data_may_be_flat_or_nested_and_must_match_the_shape() -> None:
    flat = input_from_data("input", "FP32", [2, 3], [1, 2, 3, 4, 5, 6])
    nested = input_from_data("input", "FP32", [2, 3], [[1, 2, 3], [4, 5, 6]])
    assert flat.array.dtype == np.float32 and flat.array.shape == (2, 3)
    np.testing.assert_array_equal(flat.array, nested.array)
    for bad, words in [
        ([1, 2, 3], "needs 6 values"),
        (["1", 2, 3, 4, 5, 6], "numbers"),
    ]:
        with pytest.raises(OipError) as caught:
            input_from_data("input", "FP32", [2, 3], bad)
        assert caught.value.status == 400 and words in caught.value.message
    with pytest.raises(OipError, match="cannot be int32"):  # no silent truncation
        input_from_data("input", "INT32", [2], [1.5, 2.0])
    with pytest.raises(OipError, match="not supported"):
        input_from_data("input", "BYTES", [1], ["a"])


def test_raw_data_is_little_endian_and_exactly_sized() -> None:
    values = np.arange(6, dtype="<f4")
    tensor = input_from_raw("input", "FP32", [2, 3], values.tobytes())
    np.testing.assert_array_equal(tensor.array, values.reshape(2, 3))
    with pytest.raises(OipError, match="needs 24"):
        input_from_raw("input", "FP32", [2, 3], values.tobytes()[:-1])


def test_rows_split_on_the_batch_dimension_or_take_one_example(catalog: ModelCatalog) -> None:
    spec = catalog.spec("digits")
    x = digits_rows(3)
    rows = split_rows(spec, [pixels_input(x)], max_rows=10)
    assert len(rows) == 3
    np.testing.assert_array_equal(rows[2]["input"], x[2])
    (single,) = split_rows(spec, [pixels_input(x[0])], max_rows=10)  # shape [64]
    np.testing.assert_array_equal(single["input"], x[0])
    for tensors, words in [
        ([pixels_input(x[:, :63])], "[-1, 64]"),
        ([pixels_input(np.zeros((0, 64), np.float32))], "batch size must be 1 to 10"),
        ([pixels_input(np.zeros((11, 64), np.float32))], "batch size must be 1 to 10"),
        ([InputTensor("input", "FP64", (1, 64), x[:1].astype(np.float64))], "is FP32"),
        ([InputTensor("pixels", "FP32", (1, 64), x[:1])], "takes inputs ['input']"),
        ([pixels_input(x), pixels_input(x)], "twice"),
    ]:
        with pytest.raises(OipError) as caught:
            split_rows(spec, tensors, max_rows=10)
        assert caught.value.status == 400 and words in caught.value.message


def test_every_input_must_agree_on_the_batch_size() -> None:
    spec = ModelSpec(
        name="pair",
        default_version="1",
        versions={"1": Path("unused")},
        inputs=(TensorSpec("a", "float32", (2,)), TensorSpec("b", "int64", ())),
        outputs=(TensorSpec("y", "float32", ()),),
    )
    a = InputTensor("a", "FP32", (3, 2), np.zeros((3, 2), np.float32))
    b = InputTensor("b", "INT64", (2,), np.zeros(2, np.int64))
    with pytest.raises(OipError, match="disagree on the batch size"):
        split_rows(spec, [a, b], max_rows=10)
    b3 = InputTensor("b", "INT64", (3,), np.arange(3, dtype=np.int64))
    rows = split_rows(spec, [a, b3], max_rows=10)
    assert [int(r["b"]) for r in rows] == [0, 1, 2]


# ---------------------------------------------------------------- v2 -> RequestV1


def v2_request(x: np.ndarray, **fields: Any) -> InferRequest:
    return InferRequest(model="digits", version=None, id=None, inputs=(pixels_input(x),), **fields)


def test_rows_become_requests_the_pipeline_accepts(
    catalog: ModelCatalog, decoder: RequestDecoder
) -> None:
    x = digits_rows(3)
    request = v2_request(x, key=None)
    rows = split_rows(catalog.spec("digits"), request.inputs, max_rows=10)
    built = build_submissions(decoder, request, "req", rows)
    assert [s.request.id for s in built] == ["req/0", "req/1", "req/2"]
    assert {s.partition_key for s in built} == {"req"}  # one key: one partition, one version
    for row, submission in zip(x, built, strict=True):
        assert submission.request.model == "digits" and submission.request.model_version is None
        np.testing.assert_array_equal(tensor_to_array(submission.request.inputs["input"]), row)
    (one,) = build_submissions(decoder, v2_request(x[0], key="customer-7"), "solo", rows[:1])
    assert (one.request.id, one.partition_key) == ("solo", "customer-7")
    (own,) = build_submissions(decoder, v2_request(x[0]), "solo", rows[:1])
    assert own.partition_key == "solo"


def test_the_ingest_checks_apply_to_v2_rows(catalog: ModelCatalog, decoder: RequestDecoder) -> None:
    x = np.full((1, 64), 99.0, np.float32)  # above the declared maximum of 16
    rows = split_rows(catalog.spec("digits"), [pixels_input(x)], max_rows=10)
    with pytest.raises(OipError) as caught:
        build_submissions(decoder, v2_request(x), "hot", rows)
    assert caught.value.status == 400 and "$.inputs.input" in caught.value.message


# ---------------------------------------------------------------- ResultV1 -> v2


def test_results_stack_into_batched_outputs() -> None:
    results = [result("r/0", [0.9, 0.1]), result("r/1", [0.2, 0.8])]
    wanted = [RequestedOutput("probabilities"), RequestedOutput("label", binary=True)]
    answer = response_from_results("digits", "r", results, wanted)
    assert (answer.model_name, answer.model_version, answer.id) == ("digits", "1", "r")
    probs, labels = answer.outputs
    assert (probs.name, probs.datatype, probs.shape) == ("probabilities", "FP32", (2, 2))
    np.testing.assert_allclose(probs.array, [[0.9, 0.1], [0.2, 0.8]])
    assert (labels.datatype, labels.shape, labels.binary) == ("INT64", (2,), True)
    assert labels.array.tolist() == [0, 1]
    mixed = response_from_results("digits", "r", [results[0], result("r/1", [1], "2")], wanted[1:])
    assert mixed.model_version == "1,2"


def test_a_dead_letter_is_400_with_its_reason_and_a_missing_result_504_with_ids(
    decoder: RequestDecoder,
) -> None:
    subs = [_submission(decoder, f"r/{i}") for i in range(3)]
    stored = Stored(RESULTS.encode(result("r/0", [1.0])))
    dead = DeadLettered(reason="out_of_range", message="too bright", stage="validate")
    with pytest.raises(OipError) as caught:
        collect_results("r", subs, [stored, dead, None], 1.0)
    error = caught.value
    assert error.status == 400 and error.details["reason"] == "out_of_range"
    assert error.details["id"] == "r/1" and "validate" in error.message
    with pytest.raises(OipError) as late:
        collect_results("r", subs, [stored, None, None], 1.0)
    assert late.value.status == 504
    assert late.value.body()["ids"] == ["r/1", "r/2"] and late.value.body()["id"] == "r"
    assert [r.id for r in collect_results("r", subs[:1], [stored], 1.0)] == ["r/0"]


def _submission(decoder: RequestDecoder, request_id: str) -> Submission:
    body = {"id": request_id, "model": "digits", "inputs": {"input": [0.0] * 64}}
    return decoder.decode_one(body, path="$")


# ---------------------------------------------------------------- HTTP (JSON + binary)


def test_http_body_from_tritonclient_parses_with_binary_and_json_inputs() -> None:
    x = digits_rows(2)
    binary = triton_http.InferInput("input", [2, 64], "FP32")
    binary.set_data_from_numpy(x)  # binary_data=True: after the JSON
    body, json_size = triton_http.InferenceServerClient.generate_request_body(
        [binary], request_id="h-1", timeout=250_000, parameters={"key": "k-9"}
    )
    parsed = parse_infer_request(body, str(json_size), model="digits", version="1")
    assert (parsed.id, parsed.key, parsed.version, parsed.timeout_s) == ("h-1", "k-9", "1", 0.25)
    assert parsed.outputs is None and parsed.binary_output  # tritonclient asks for binary
    np.testing.assert_array_equal(parsed.inputs[0].array, x)

    as_json = triton_http.InferInput("input", [2, 64], "FP32")
    as_json.set_data_from_numpy(x, binary_data=False)
    wanted = triton_http.InferRequestedOutput("label", binary_data=False)
    body, json_size = triton_http.InferenceServerClient.generate_request_body(
        [as_json], outputs=[wanted]
    )
    parsed = parse_infer_request(
        body, None if json_size is None else str(json_size), model="digits", version=None
    )
    assert parsed.outputs == (RequestedOutput("label", binary=False),)
    np.testing.assert_array_equal(parsed.inputs[0].array, x)


@pytest.mark.parametrize(
    ("body", "header", "words"),
    [
        (b"{", None, "not valid JSON"),
        (b'{"inputs": [{"name": "input"}]}', None, "invalid inference request"),
        (b'{"inputs": [{"name": "input", "shape": [1], "datatype": "FP32"}]}', None, "neither"),
        (b'{"inputs": []}', "99", "does not fit the body"),
        (
            b'{"inputs": [{"name": "input", "shape": [1], "datatype": "FP32",'
            b' "parameters": {"binary_data_size": 8}}]}1234',
            "88",
            "ends before its binary data",
        ),
        (b'{"inputs": [], "parameters": {"timeout": -1}}', None, "microseconds"),
    ],
)
def test_http_bodies_that_are_not_v2_requests_are_400(
    body: bytes, header: str | None, words: str
) -> None:
    if header == "88":
        header = str(body.index(b"1234"))
    with pytest.raises(OipError) as caught:
        parse_infer_request(body, header, model="digits", version=None)
    assert caught.value.status == 400 and words in caught.value.message


def test_http_response_decodes_with_tritonclient() -> None:
    results = [result("r/0", [0.25, 0.75]), result("r/1", [0.5, 0.5])]
    wanted = [RequestedOutput("probabilities", binary=True), RequestedOutput("label")]
    response = infer_response(response_from_results("digits", "r", results, wanted))
    header = int(response.headers["inference-header-content-length"])
    parsed = triton_http.InferenceServerClient.parse_response_body(
        bytes(response.body), header_length=header
    )
    np.testing.assert_allclose(parsed.as_numpy("probabilities"), [[0.25, 0.75], [0.5, 0.5]])
    assert parsed.as_numpy("label").tolist() == [1, 0]
    assert parsed.get_response()["id"] == "r"
    plain = infer_response(response_from_results("digits", "r", results, wanted[1:]))
    assert "inference-header-content-length" not in plain.headers
    assert msgspec.json.decode(bytes(plain.body))["outputs"][0]["data"] == [1, 0]


# ---------------------------------------------------------------- gRPC messages


def test_grpc_request_from_tritonclients_proto_raw_and_typed() -> None:
    x = digits_rows(2)
    theirs = triton_pb.ModelInferRequest(model_name="digits", model_version="1", id="g-1")
    theirs.inputs.add(name="input", datatype="FP32", shape=[2, 64])
    theirs.raw_input_contents.append(x.astype("<f4").tobytes())
    theirs.parameters["timeout"].int64_param = 500_000
    theirs.outputs.add(name="probabilities")
    parsed = infer_request_from_proto(pb.ModelInferRequest.FromString(theirs.SerializeToString()))
    assert (parsed.model, parsed.version, parsed.id, parsed.timeout_s) == (
        "digits",
        "1",
        "g-1",
        0.5,
    )
    assert parsed.outputs == (RequestedOutput("probabilities"),)
    np.testing.assert_array_equal(parsed.inputs[0].array, x)

    typed = pb.ModelInferRequest(model_name="digits")
    tensor = typed.inputs.add(name="input", datatype="FP32", shape=[64])
    tensor.contents.fp32_contents.extend(x[0].tolist())
    typed.parameters["key"].string_param = "k-1"
    parsed = infer_request_from_proto(typed)
    assert (parsed.version, parsed.id, parsed.key) == (None, None, "k-1")
    np.testing.assert_array_equal(parsed.inputs[0].array, x[0])

    broken = pb.ModelInferRequest(model_name="digits", raw_input_contents=[b"", b""])
    broken.inputs.add(name="input", datatype="FP32", shape=[64])
    with pytest.raises(OipError, match="2 raw_input_contents for 1 inputs"):
        infer_request_from_proto(broken)


def test_grpc_response_decodes_with_tritonclient() -> None:
    results = [result("r/0", [0.25, 0.75]), result("r/1", [0.5, 0.5])]
    wanted = [RequestedOutput("probabilities"), RequestedOutput("label")]
    ours = infer_response_to_proto(response_from_results("digits", "r", results, wanted))
    theirs = triton_pb.ModelInferResponse.FromString(ours.SerializeToString())
    answer = triton_grpc.InferResult(theirs)
    np.testing.assert_allclose(answer.as_numpy("probabilities"), [[0.25, 0.75], [0.5, 0.5]])
    assert answer.as_numpy("label").tolist() == [1, 0]
    assert (theirs.id, theirs.model_version) == ("r", "1")


# ---------------------------------------------------------------- the CLI flag


def test_ingest_grpc_port_reaches_the_app_factory(monkeypatch: pytest.MonkeyPatch) -> None:
    import ingest.server
    from streaminfer.cli import main
    from streaminfer.ingest_app import grpc_config
    from streaminfer.settings import Settings

    served: list[str] = []
    monkeypatch.setattr(ingest.server, "serve", lambda factory, **_: served.append(factory) or 0)
    # Set first so that monkeypatch restores them after the CLI wrote its own values.
    monkeypatch.setenv("STREAMINFER_INGEST_GRPC_PORT", "1")
    monkeypatch.setenv("STREAMINFER_INGEST_HOST", "127.0.0.1")
    assert main(["ingest", "--grpc-port", "50123", "--host", "127.0.0.2"]) == 0
    assert served == ["streaminfer.ingest_app:create_app"]
    config = grpc_config(Settings())  # what the factory reads in the worker
    assert config is not None and (config.host, config.port) == ("127.0.0.2", 50123)
    monkeypatch.delenv("STREAMINFER_INGEST_GRPC_PORT")
    assert grpc_config(Settings()) is None


_REDIS_DOWN = RedisError("down")  # redis-py's own repr: "server:RedisError"


@pytest.mark.parametrize(
    ("exc", "status", "message", "grpc_code"),
    [
        (QueueFull("queue full"), 429, "queue full; retry later", "RESOURCE_EXHAUSTED"),
        (Overloaded("filled", Delivery()), 429, "filled; retry later", "RESOURCE_EXHAUSTED"),
        (BatchTooLarge("9 requests"), 413, "9 requests", "INVALID_ARGUMENT"),
        (KafkaUnavailable("no ack", Delivery()), 503, "no ack", "UNAVAILABLE"),
        (
            ResultsUnavailable("x"),
            503,
            "Redis is unavailable: ResultsUnavailable('x')",
            "UNAVAILABLE",
        ),
        (_REDIS_DOWN, 503, f"Redis is unavailable: {_REDIS_DOWN!r}", "UNAVAILABLE"),
    ],
)
def test_service_errors_answer_the_same_on_both_doors(
    exc: Exception, status: int, message: str, grpc_code: str
) -> None:
    assert isinstance(exc, SERVICE_ERRORS)
    error = service_error(exc)
    assert (error.status, error.body()) == (status, {"error": message})
    assert GRPC_CODES[error.status] == grpc_code

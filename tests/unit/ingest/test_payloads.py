"""HTTP bodies -> RequestV1: the accepted forms, and precise errors for everything else."""

from __future__ import annotations

import base64
import time

import msgspec
import numpy as np
import pytest

from ingest.payloads import (
    BatchTooLarge,
    InvalidBody,
    RequestDecoder,
    RequestTooLarge,
    Submission,
    UnsupportedMediaType,
)
from schemas import Codec, RequestV1, tensor_to_array
from schemas.models import ModelCatalog
from schemas.validation import DLQ_ERROR_MAX_CHARS, request_size_limit
from stages.dlq import dlq_output
from stages.records import Record, Rejection, wire_size
from stages.validate import ValidateStage
from tests.helpers import MODELS

PIXELS = [float(i % 16) for i in range(64)]


@pytest.fixture(scope="module")
def decoder() -> RequestDecoder:
    ids = iter(f"gen-{i}" for i in range(1000))
    return RequestDecoder(
        catalog=ModelCatalog(MODELS),
        max_batch=3,
        message_max_bytes=1_000_000,
        clock=lambda: 1000.0,
        new_id=lambda: next(ids),
    )


def decode(decoder: RequestDecoder, body: object, **kwargs: bool) -> list[Submission]:
    return decoder.decode_body(msgspec.json.encode(body), "application/json", **kwargs)


def errors(
    decoder: RequestDecoder, body: object, content_type: str = "application/json"
) -> list[tuple[str, str]]:
    raw = body if isinstance(body, bytes) else msgspec.json.encode(body)
    with pytest.raises(InvalidBody) as caught:
        decoder.decode_body(raw, content_type)
    return [(e.path, e.reason) for e in caught.value.errors]


def pixels_of(submission: Submission) -> np.ndarray:
    return tensor_to_array(submission.request.inputs["input"])


@pytest.mark.parametrize(
    "tensor",
    [
        PIXELS,
        {"values": PIXELS},
        {"dtype": "float32", "shape": [64], "values": PIXELS},
        {"dtype": "float32", "values": PIXELS},
        {
            "dtype": "float32",
            "shape": [64],
            "data": base64.b64encode(np.array(PIXELS, "<f4").tobytes()).decode(),
        },
    ],
    ids=["nested-list", "values", "values-shape-dtype", "values-dtype", "base64"],
)
def test_every_tensor_form_gives_the_same_wire_tensor(
    decoder: RequestDecoder, tensor: object
) -> None:
    (submission,) = decode(decoder, {"model": "digits", "inputs": {"input": tensor}})
    assert submission.request.inputs["input"].dtype == "float32"
    np.testing.assert_array_equal(pixels_of(submission), np.array(PIXELS, dtype=np.float32))


def test_values_are_reshaped_to_the_given_shape(decoder: RequestDecoder) -> None:
    decoder_free = RequestDecoder(catalog=None, max_batch=10, message_max_bytes=1_000_000)
    (submission,) = decode(
        decoder_free,
        {"model": "m", "inputs": {"x": {"shape": [2, 3], "values": [1, 2, 3, 4, 5, 6]}}},
    )
    assert tensor_to_array(submission.request.inputs["x"]).tolist() == [[1, 2, 3], [4, 5, 6]]


def test_id_and_created_at_default_and_key_defaults_to_the_id(decoder: RequestDecoder) -> None:
    (submission,) = decode(decoder, {"model": "digits", "inputs": {"input": PIXELS}})
    assert submission.request.id.startswith("gen-")
    assert submission.request.created_at == 1000.0
    assert submission.partition_key == submission.request.id


def test_client_id_and_key_are_kept_and_key_stays_out_of_the_record(
    decoder: RequestDecoder,
) -> None:
    body = {"id": "order-7", "key": "customer-3", "model": "digits", "inputs": {"input": PIXELS}}
    (submission,) = decode(decoder, body)
    assert (submission.request.id, submission.partition_key) == ("order-7", "customer-3")
    assert Codec(RequestV1).decode(submission.value) == submission.request
    assert b"customer-3" not in submission.value


def test_msgpack_body_with_binary_data(decoder: RequestDecoder) -> None:
    data = np.array(PIXELS, "<f4").tobytes()
    body = msgspec.msgpack.encode(
        [
            {
                "id": f"m{i}",
                "model": "digits",
                "inputs": {"input": {"dtype": "float32", "shape": [64], "data": data}},
            }
            for i in range(2)
        ]
    )
    submissions = decoder.decode_body(body, "application/msgpack")
    assert [s.request.id for s in submissions] == ["m0", "m1"]
    assert submissions[0].request.inputs["input"].data == data


def test_schema_errors_name_the_field_path(decoder: RequestDecoder) -> None:
    body = [
        {"model": "digits", "inputs": {"input": PIXELS}},
        {"model": 5, "inputs": {"input": PIXELS}},
        {"model": "digits", "inputs": {"input": {"dtype": "float31", "shape": [64], "data": ""}}},
    ]
    assert errors(decoder, body) == [
        ("$[1].model", "malformed"),
        ("$[2].inputs.input.dtype", "malformed"),
    ]


def test_model_signature_is_checked_before_kafka(decoder: RequestDecoder) -> None:
    body = [
        {"model": "cats", "inputs": {"input": PIXELS}},
        {"model": "digits", "inputs": {"input": PIXELS[:10]}},
        {"model": "digits", "inputs": {"input": [100.0] * 64}},
    ]
    assert errors(decoder, body) == [
        ("$[0].model", "unknown_model"),
        ("$[1].inputs.input", "signature_mismatch"),
        ("$[2].inputs.input", "out_of_range"),
    ]


def test_expired_deadline_is_refused(decoder: RequestDecoder) -> None:
    body = {"model": "digits", "inputs": {"input": PIXELS}, "deadline": 999.0}
    assert errors(decoder, body) == [("$.deadline", "expired")]


@pytest.mark.parametrize(
    ("tensor", "path"),
    [
        (["a"] * 64, "$.inputs.input"),
        ([[1.0, 2.0], [3.0]], "$.inputs.input"),
        ({"dtype": "int8", "values": [300]}, "$.inputs.input.values"),
        ({"dtype": "int32", "values": [1.5]}, "$.inputs.input.values"),
        ({"values": PIXELS, "shape": [3]}, "$.inputs.input.shape"),
        ({"values": PIXELS, "data": "AA=="}, "$.inputs.input"),
        ({"values": PIXELS, "colour": "red"}, "$.inputs.input"),
        ({"dtype": "complex64", "values": PIXELS}, "$.inputs.input.dtype"),
        ("not a tensor", "$.inputs.input"),
    ],
)
def test_bad_tensor_values_are_malformed_with_a_path(
    decoder: RequestDecoder, tensor: object, path: str
) -> None:
    assert errors(decoder, {"model": "digits", "inputs": {"input": tensor}}) == [
        (path, "malformed")
    ]


@pytest.mark.parametrize(
    ("raw", "content_type", "path"),
    [
        (b"{not json", "application/json", "$"),
        (b"\xc1", "application/msgpack", "$"),
        (b"42", "application/json", "$"),
        (b"[]", "application/json", "$"),
        (b'[{"model": "digits", "inputs": {}, "key": 5}]', "application/json", "$[0].key"),
    ],
)
def test_bodies_that_are_not_requests(
    decoder: RequestDecoder, raw: bytes, content_type: str, path: str
) -> None:
    assert errors(decoder, raw, content_type) == [(path, "malformed")]


def test_batch_over_the_limit_and_predict_refuses_batches(decoder: RequestDecoder) -> None:
    one = {"model": "digits", "inputs": {"input": PIXELS}}
    with pytest.raises(BatchTooLarge):
        decode(decoder, [one] * 4)
    with pytest.raises(InvalidBody):
        decode(decoder, [one], batch=False)
    assert len(decode(decoder, [one] * 3)) == 3


def test_other_content_types_are_unsupported(decoder: RequestDecoder) -> None:
    with pytest.raises(UnsupportedMediaType):
        decoder.decode_body(b"model=digits", "application/x-www-form-urlencoded")
    (submission,) = decoder.decode_body(
        msgspec.json.encode({"model": "digits", "inputs": {"input": PIXELS}}), None
    )
    assert submission.request.model == "digits"


def test_the_count_is_checked_before_any_item_is_decoded(decoder: RequestDecoder) -> None:
    # Item 0 is invalid, but the body is refused for its count: no item was looked at.
    with pytest.raises(BatchTooLarge):
        decoder.decode_body(b"[" + b",".join([b"[]"] * 300_000) + b"]", "application/json")
    with pytest.raises(BatchTooLarge):
        decoder.decode_body(msgspec.msgpack.encode([[]] * 300_000), "application/msgpack")


DEEP_JSON = b'{"model": "digits", "inputs": {"input": ' + b"[" * 5000 + b"]" * 5000 + b"}}"
DEEP_MSGPACK = b"\x91" * 5000 + b"\xc0"


@pytest.mark.parametrize(
    ("raw", "content_type", "expected"),
    [
        (DEEP_JSON, "application/json", ("$", "malformed")),
        (b"[" + DEEP_JSON + b"]", "application/json", ("$", "malformed")),
        (DEEP_MSGPACK, "application/msgpack", ("$", "malformed")),
        (b'{"model": "digits", "inputs": {}, "created_at": 1e400}', "application/json", None),
        (
            msgspec.msgpack.encode({"model": "digits", "inputs": {1: PIXELS}}),
            "application/msgpack",
            ("$.inputs", "malformed"),
        ),
        (
            msgspec.msgpack.encode({"model": "digits", "inputs": {"input": PIXELS}, 5: 1}),
            "application/msgpack",
            ("$", "malformed"),
        ),
        (
            msgspec.json.encode(
                {"model": "digits", "inputs": {"input": {"shape": [0, 2**62], "values": []}}}
            ),
            "application/json",
            ("$.inputs.input.shape", "malformed"),
        ),
    ],
    ids=["deep-json", "deep-json-batch", "deep-msgpack", "1e400", "int-name", "int-key", "shape"],
)
def test_hostile_bodies_are_malformed_with_a_path(
    decoder: RequestDecoder, raw: bytes, content_type: str, expected: tuple[str, str] | None
) -> None:
    [(path, reason)] = errors(decoder, raw, content_type)
    assert reason == "malformed"
    if expected is not None:
        assert (path, reason) == expected


@pytest.mark.parametrize(
    ("created_at", "path"),
    [(float("nan"), "$.created_at"), (float("inf"), "$.created_at"), (-1e9, "$.created_at")],
)
def test_times_are_checked_with_or_without_models(
    decoder: RequestDecoder, created_at: float, path: str
) -> None:
    body = msgspec.msgpack.encode(
        {"model": "digits", "inputs": {"input": PIXELS}, "created_at": created_at}
    )
    assert errors(decoder, body, "application/msgpack") == [(path, "malformed")]
    free = RequestDecoder(catalog=None, max_batch=1, message_max_bytes=1_000_000)
    assert errors(free, body, "application/msgpack") == [(path, "malformed")]


def test_a_shape_too_large_to_encode_is_malformed_without_models() -> None:
    free = RequestDecoder(catalog=None, max_batch=1, message_max_bytes=1_000_000)
    tensor = {"dtype": "float32", "shape": [2**70], "data": ""}
    assert errors(free, {"model": "m", "inputs": {"x": tensor}}) == [("$", "malformed")]


MEASURE = RequestDecoder(catalog=None, max_batch=1, message_max_bytes=10**9)


def _record_size(body: dict[str, object]) -> int:
    (submission,) = MEASURE.decode_body(msgspec.msgpack.encode(body), "application/msgpack")
    return len(submission.value) + len(submission.partition_key.encode())


def _pad_to(body: dict[str, object], target: int) -> dict[str, object]:
    """``body`` with an attribute padded so that its record (value plus key) takes exactly
    ``target`` bytes (MessagePack headers grow with lengths: converge in a few steps)."""
    pad = 0
    for _ in range(5):
        padded = {**body, "attributes": {"pad": "p" * pad}}
        size = _record_size(padded)
        if size == target:
            return padded
        pad += target - size
    raise AssertionError("no padding fits")


def _sized(target: int) -> dict[str, object]:
    body = {"id": "big", "model": "m", "created_at": time.time(), "inputs": {"x": [1.0]}}
    return _pad_to(body, target)


def test_a_request_too_large_for_the_pipeline_is_413_and_sinks_the_batch() -> None:
    limit = request_size_limit(100_000)
    sized = RequestDecoder(catalog=None, max_batch=3, message_max_bytes=100_000)
    small = {"id": "s", "model": "m", "inputs": {"x": [1.0]}}
    at_limit = _sized(limit)
    assert len(sized.decode_body(msgspec.msgpack.encode(at_limit), "application/msgpack")) == 1
    over = _sized(limit + 1)
    body = msgspec.msgpack.encode([small, small, over])
    with pytest.raises(RequestTooLarge) as caught:
        sized.decode_body(body, "application/msgpack")
    [error] = caught.value.errors
    assert (error.path, error.reason) == ("$[2]", "too_large")
    # mixed with another error, the body is a 422 that lists both
    body = msgspec.msgpack.encode([{**small, "model": 5}, over])
    with pytest.raises(InvalidBody) as mixed:
        sized.decode_body(body, "application/msgpack")
    assert not isinstance(mixed.value, RequestTooLarge)
    assert [e.reason for e in mixed.value.errors] == ["malformed", "too_large"]


def test_a_request_at_the_limit_fits_every_record_the_pipeline_makes_of_it() -> None:
    """What ingest accepts flows to the end: validate's output, and a dead letter of it with
    the longest dlq.error, fit message_max_bytes without truncation."""
    max_bytes = 100_000
    limit = request_size_limit(max_bytes)
    pixels = np.zeros(64, np.float32).tobytes()
    now = time.time()
    body = {
        "id": "i" * 256,
        "key": "k" * 256,
        "model": "digits",
        "created_at": now,
        "deadline": now + 60,
        "inputs": {"input": {"dtype": "float32", "shape": [64], "data": pixels}},
    }
    sized = RequestDecoder(catalog=ModelCatalog(MODELS), max_batch=1, message_max_bytes=max_bytes)
    padded = msgspec.msgpack.encode(_pad_to(body, limit))
    (submission,) = sized.decode_body(padded, "application/msgpack")
    assert len(submission.value) + len(submission.partition_key) == limit
    headers = [
        ("content-type", b"application/msgpack"),
        ("schema", b"inference.request/1"),
        ("traceparent", b"00-" + b"a" * 32 + b"-" + b"b" * 16 + b"-01"),
        ("streaminfer.tenant", b"t" * 64),
    ]
    key = submission.partition_key.encode()
    source = Record("inference.requests", 0, 2**62, key, submission.value, tuple(headers))
    outcome = ValidateStage(catalog=ModelCatalog(MODELS), output_topic="v").process([source])
    [validated] = outcome.outputs
    assert wire_size(validated) <= max_bytes
    as_record = Record(
        "inference.validated", 0, 2**62, key, validated.value, tuple(validated.headers)
    )  # type: ignore[arg-type]
    topic = "t" * 249  # Kafka's longest topic name
    for record in (source, as_record):
        dead = dlq_output(
            Rejection(record, "inference_error", "\N{GRINNING FACE}" * DLQ_ERROR_MAX_CHARS),
            stage="infer",
            dlq_topic=topic,
            max_bytes=max_bytes,
        )
        assert dict(dead.headers).get("dlq.truncated") is None
        assert dead.value == record.value

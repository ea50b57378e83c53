"""HTTP bodies -> RequestV1: the accepted forms, and precise errors for everything else."""

from __future__ import annotations

import base64

import msgspec
import numpy as np
import pytest

from ingest.payloads import (
    BatchTooLarge,
    InvalidBody,
    RequestDecoder,
    Submission,
    UnsupportedMediaType,
)
from schemas import Codec, RequestV1, tensor_to_array
from stages.models import ModelRegistry
from tests.helpers import MODELS

PIXELS = [float(i % 16) for i in range(64)]


@pytest.fixture(scope="module")
def decoder() -> RequestDecoder:
    ids = iter(f"gen-{i}" for i in range(1000))
    return RequestDecoder(
        registry=ModelRegistry(root=MODELS),
        max_batch=3,
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
    decoder_free = RequestDecoder(registry=None, max_batch=10)
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

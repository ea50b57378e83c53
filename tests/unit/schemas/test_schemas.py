import json
import re

import numpy as np
import pytest

from schemas import (
    Codec,
    DecodeError,
    RequestV1,
    ResultV1,
    jsonschema,
    tensor_from_array,
    tensor_to_array,
)
from schemas.messages import Tensor
from schemas.tensors import TensorError
from tests.helpers import digits_request, encode_raw


def test_request_round_trips_through_msgpack() -> None:
    request = digits_request(np.arange(64, dtype=np.float32), attributes={"user": "u1"})
    codec = Codec(RequestV1)
    assert codec.decode(codec.encode(request)) == request


def test_tensor_decodes_as_a_zero_copy_view() -> None:
    array = np.arange(12, dtype=np.int64).reshape(3, 4)
    tensor = tensor_from_array(array)
    view = tensor_to_array(tensor)
    np.testing.assert_array_equal(view, array)
    assert not view.flags.owndata  # a view over the message's bytes, not a copy
    assert view.base is not None


def test_tensor_with_wrong_buffer_size_is_refused() -> None:
    tensor = Tensor(dtype="float32", shape=[64], data=b"\x00" * 10)
    with pytest.raises(TensorError, match="needs 256"):
        tensor_to_array(tensor)


def test_big_endian_arrays_travel_as_little_endian() -> None:
    array = np.arange(4, dtype=">i4")
    tensor = tensor_from_array(array)
    assert tensor.data == np.arange(4, dtype="<i4").tobytes()


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (b"\xc1not msgpack", "not valid MessagePack"),
        (encode_raw({"id": 7, "model": "digits", "inputs": {}, "created_at": 1.0}), "$.id"),
        (encode_raw({"id": "a", "model": "digits", "created_at": 1.0}), "`inputs`"),
        (encode_raw({"id": "", "model": "d", "inputs": {}, "created_at": 1.0}), "length >= 1"),
        (
            encode_raw(
                {
                    "id": "a",
                    "model": "d",
                    "created_at": 1.0,
                    "inputs": {"x": {"dtype": "complex", "shape": [1], "data": b""}},
                }
            ),
            "$.inputs[...].dtype",
        ),
    ],
)
def test_decode_errors_say_what_and_where(value: bytes, message: str) -> None:
    with pytest.raises(DecodeError, match=re.escape(message)):
        Codec(RequestV1).decode(value)


def test_unknown_fields_are_ignored_for_forward_compatibility() -> None:
    payload = {"id": "a", "model": "digits", "inputs": {}, "created_at": 1.0, "future": 1}
    assert Codec(RequestV1).decode(encode_raw(payload)).id == "a"


def test_checked_in_json_schemas_match_the_structs() -> None:
    # Compared as parsed JSON: the meaning, not the text layout of whatever wrote the files.
    generated = {name: json.loads(text) for name, text in jsonschema.generate().items()}
    on_disk = {p.name: json.loads(p.read_text()) for p in jsonschema.SCHEMA_DIR.glob("*.json")}
    assert on_disk == generated, "run `streaminfer schemas export` and commit the result"


def test_schema_descriptions_do_not_depend_on_how_msgspec_renders_docstrings() -> None:
    # msgspec < 0.23 kept the docstring's indentation, 0.23 dedents it: both give one text.
    indented = {"description": "Summary.\n\n    Detail.\n    More.", "x": [{"description": " a"}]}
    dedented = {"description": "Summary.\n\nDetail.\nMore.", "x": [{"description": "a"}]}
    assert jsonschema.normalise(indented) == jsonschema.normalise(dedented) == dedented


def test_a_property_named_description_is_kept_as_a_schema() -> None:
    node = {"properties": {"description": {"type": "string", "description": "  free text"}}}
    assert jsonschema.normalise(node) == {
        "properties": {"description": {"type": "string", "description": "free text"}}
    }


def test_every_message_has_a_schema_file() -> None:
    names = set(jsonschema.generate())
    assert names == {
        "inference.request.v1.json",
        "inference.validated.v1.json",
        "inference.result.v1.json",
        "inference.stored.v1.json",
        "inference.model-state.v1.json",
    }


def test_result_status_is_constrained() -> None:
    payload = {
        "id": "a",
        "model": "m",
        "model_version": "1",
        "status": "weird",
        "outputs": {},
        "created_at": 1.0,
    }
    with pytest.raises(DecodeError, match="status"):
        Codec(ResultV1).decode(encode_raw(payload))

"""The codec turns every failure to decode, whatever the bytes, into DecodeError."""

from __future__ import annotations

import msgspec
import pytest

from schemas import RequestV1, ResultV1, StoredV1, ValidatedRequestV1
from schemas.codec import Codec, DecodeError

# A map {"id": "a", "x": [[[...nil...]]]}: an unknown field nested far deeper than
# msgspec's recursion limit (it raises RecursionError, not one of its own errors).
DEEP = b"\x82\xa2id\xa1a\xa1x" + b"\x91" * 100_000 + b"\xc0"


@pytest.mark.parametrize("message", [RequestV1, ValidatedRequestV1, ResultV1, StoredV1])
def test_nesting_beyond_the_recursion_limit_is_a_decode_error(message: type) -> None:
    with pytest.raises(RecursionError):  # what msgspec itself does
        msgspec.msgpack.Decoder(message).decode(DEEP)
    with pytest.raises(DecodeError, match="nested too deeply"):
        Codec(message).decode(DEEP)


def test_a_value_that_is_not_bytes_is_a_decode_error() -> None:
    with pytest.raises(DecodeError, match="TypeError"):
        Codec(RequestV1).decode(None)  # type: ignore[arg-type]

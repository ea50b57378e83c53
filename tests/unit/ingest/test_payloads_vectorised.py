"""The body decoder builds a batch's list-form tensors together and checks them with a few
numpy calls (``_Vectorised``): its outcome must be exactly ``decode_one`` item by item, the
reference definition, for every body (same records byte for byte, or the same errors)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any
from unittest.mock import ANY

import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ingest.payloads import (
    FieldError,
    InvalidBody,
    RandomIds,
    RequestDecoder,
    RequestTooLarge,
    _Vectorised,
)
from schemas.models import ModelCatalog
from tests.helpers import MODELS

CATALOG = ModelCatalog(MODELS)
Outcome = tuple[str, list[FieldError]] | list[tuple[bytes, str]]


def decoder(*, catalog: ModelCatalog | None, message_max_bytes: int = 1_000_000) -> RequestDecoder:
    ids = iter(range(1_000_000))
    return RequestDecoder(
        catalog=catalog,
        max_batch=50,
        message_max_bytes=message_max_bytes,
        clock=lambda: 1_000_000.0,
        new_id=lambda: f"gen-{next(ids)}",
    )


def outcome(run: Callable[[], list[Any]]) -> Outcome:
    try:
        return [(s.value, s.partition_key) for s in run()]
    except InvalidBody as exc:  # RequestTooLarge (413) or InvalidBody (422), and the errors
        return type(exc).__name__, exc.errors


def reference(make: Callable[[], RequestDecoder], body: Any) -> Outcome:
    """The original algorithm: ``decode_one`` per item, every item's errors collected."""
    one = make()
    items, paths = (
        (body, [f"$[{i}]" for i in range(len(body))])
        if isinstance(body, list)
        else (
            [body],
            ["$"],
        )
    )

    def run() -> list[Any]:
        done, errors = [], []
        for item, path in zip(items, paths, strict=True):
            try:
                done.append(one.decode_one(item, path=path))
            except InvalidBody as exc:
                errors.extend(exc.errors)
        if errors:
            too_large = all(e.reason == "too_large" for e in errors)
            raise (RequestTooLarge if too_large else InvalidBody)(errors)
        return done

    return outcome(run)


def vectorised(make: Callable[[], RequestDecoder], body: Any, kind: str) -> Outcome:
    encoded = msgspec.msgpack.encode(body) if kind == "msgpack" else msgspec.json.encode(body)
    content_type = f"application/{kind}"
    return outcome(lambda: make().decode_body(encoded, content_type))


# Numbers that convert alike one by one or together, and some that do not.
numbers = st.one_of(
    st.floats(min_value=-1, max_value=17, width=32),
    st.integers(min_value=0, max_value=16),
    st.booleans(),
    st.sampled_from([0.0, 16.0, 16.000001, -0.0, 1e-45, 2**53, 2**53 + 1, 2**60 + 1, -(2**63)]),
    st.integers(min_value=-(2**64), max_value=2**64),
    st.floats(allow_nan=True, allow_infinity=True),
)
pixels = st.lists(numbers, min_size=64, max_size=64)
values = st.one_of(
    pixels,
    pixels.map(
        lambda v: [int(abs(x)) % 17 if isinstance(x, float) and abs(x) < 1e18 else 3 for x in v]
    ),
    st.lists(numbers, max_size=70),
    st.lists(st.lists(numbers, min_size=8, max_size=8), min_size=8, max_size=8),
    st.just([]),
    st.lists(st.one_of(numbers, st.text(max_size=2), st.none()), max_size=3),
)
inputs = st.one_of(
    st.fixed_dictionaries({"input": values}),
    st.dictionaries(st.sampled_from(["input", "other"]), values, max_size=2),
    st.fixed_dictionaries({"input": st.fixed_dictionaries({"values": values})}),
)
requests = st.fixed_dictionaries(
    {"inputs": inputs},
    optional={
        "model": st.sampled_from(["digits", "breast_cancer", "nope", 3]),
        "id": st.one_of(st.text(min_size=1, max_size=5), st.none()),
        "key": st.one_of(st.text(max_size=5), st.none(), st.integers()),
        "created_at": st.one_of(st.just(1_000_000.5), st.just(-1e12), st.none()),
        "deadline": st.one_of(st.just(999_999.0), st.just(1_000_100.0)),
        "attributes": st.dictionaries(st.sampled_from(["a", "row", "streaminfer.x"]), st.just("v")),
        "model_version": st.sampled_from(["1", "9"]),
    },
)
bodies = st.one_of(requests, st.lists(requests, min_size=1, max_size=6))


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(body=bodies, kind=st.sampled_from(["json", "msgpack"]), models=st.booleans())
def test_vectorised_decoding_is_decode_one_item_by_item(body: Any, kind: str, models: bool) -> None:
    def make() -> RequestDecoder:
        return decoder(catalog=CATALOG if models else None)

    # The reference decodes items as they travel: JSON has no NaN or infinity, and the
    # integers MessagePack cannot hold are refused before any item is decoded.
    try:
        encoded = msgspec.msgpack.encode(body) if kind == "msgpack" else msgspec.json.encode(body)
    except (OverflowError, msgspec.EncodeError):
        return
    travelled = (msgspec.msgpack if kind == "msgpack" else msgspec.json).decode(encoded)
    assert vectorised(make, travelled, kind) == reference(make, travelled)


def plain_batch(count: int) -> list[dict[str, Any]]:
    return [
        {"model": "digits", "inputs": {"input": [float(i % 17) for i in range(64)]}, "key": "k"}
        for _ in range(count)
    ]


def test_a_batch_of_plain_requests_takes_the_vectorised_path_and_matches() -> None:
    body = plain_batch(20)
    body[3]["inputs"]["input"][5] = 17.0  # above the model's maximum: not surely clean
    built = _Vectorised.build(decoder(catalog=CATALOG), list(body))
    assert sorted(built.tensors) == list(range(20))
    assert built.clean == set(range(20)) - {3}
    expected = reference(lambda: decoder(catalog=CATALOG), body)
    assert expected == ("InvalidBody", [FieldError("$[3].inputs.input", "out_of_range", ANY)])
    assert vectorised(lambda: decoder(catalog=CATALOG), body, "json") == expected
    del body[3]
    accepted = vectorised(lambda: decoder(catalog=CATALOG), body, "json")
    assert accepted == reference(lambda: decoder(catalog=CATALOG), body)
    assert len(accepted) == 19


def test_items_that_cannot_be_joined_take_decode_one() -> None:
    body = plain_batch(5)
    body[2]["inputs"]["input"] = body[2]["inputs"]["input"][:8]  # the joint would be ragged
    assert _Vectorised.build(decoder(catalog=CATALOG), list(body)).tensors == {}
    expected = reference(lambda: decoder(catalog=CATALOG), body)
    assert expected == ("InvalidBody", [FieldError("$[2].inputs.input", "signature_mismatch", ANY)])
    assert vectorised(lambda: decoder(catalog=CATALOG), body, "json") == expected


def test_a_request_too_large_sinks_the_batch_the_same_way() -> None:
    body = [{"model": "digits", "inputs": {"input": [1.0] * 64}, "attributes": {"pad": "p" * 6000}}]
    small = 24_000  # the pipeline margin is ~18.5 KB: room for a request of ~5 KB

    def make() -> RequestDecoder:
        return decoder(catalog=CATALOG, message_max_bytes=small)

    expected = reference(make, body * 3)
    assert expected[0] == "RequestTooLarge"
    assert vectorised(make, body * 3, "json") == expected


@pytest.mark.parametrize("count", [1, 3])
def test_random_ids_are_unique_hex(count: int) -> None:
    ids = RandomIds()
    drawn = [ids() for _ in range(600 * count)]  # more than one 4 KiB draw
    assert len(set(drawn)) == len(drawn)
    assert all(len(i) == 32 and int(i, 16) >= 0 for i in drawn)

"""The one definition of a valid request: typed results with reason and field path."""

from __future__ import annotations

import math

import numpy as np
import pytest

from schemas import RequestV1, Tensor, tensor_from_array
from schemas.models import ModelCatalog
from schemas.validation import (
    TIME_WINDOW_S,
    Invalid,
    Validated,
    check_inputs,
    decode_request,
    numerically_clean,
    validate_request,
)
from tests.helpers import MODELS, holdout

NOW = 1_700_000_000.0
CATALOG = ModelCatalog(MODELS)
PIXELS = holdout()[0][0]


def request(**fields: object) -> RequestV1:
    values: dict[str, object] = {
        "id": "r1",
        "model": "digits",
        "inputs": {"input": tensor_from_array(PIXELS)},
        "created_at": NOW - 1,
        **fields,
    }
    return RequestV1(**values)  # type: ignore[arg-type]


def verdict(**fields: object) -> tuple[str, str]:
    result = validate_request(request(**fields), CATALOG, now=NOW)
    assert isinstance(result, Invalid), result
    return result.reason, result.path


def test_a_good_request_resolves_its_version() -> None:
    result = validate_request(request(deadline=NOW + 5), CATALOG, now=NOW)
    assert isinstance(result, Validated)
    assert result.version == "1"
    message = result.message(validated_at=NOW)
    # No version named: the message leaves it to infer's routing.
    assert (message.model_version, message.validated_at, message.deadline) == (None, NOW, NOW + 5)
    named = validate_request(request(model_version="1"), CATALOG, now=NOW)
    assert isinstance(named, Validated)
    assert named.message(validated_at=NOW).model_version == "1"


@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        ({"model": "cats"}, ("unknown_model", "$.model")),
        ({"model_version": "9"}, ("unknown_model", "$.model_version")),
        ({"deadline": NOW - 2}, ("expired", "$.deadline")),
        ({"inputs": {"pixels": tensor_from_array(PIXELS)}}, ("signature_mismatch", "$.inputs")),
        (
            {"inputs": {"input": tensor_from_array(PIXELS.astype(np.float64))}},
            ("signature_mismatch", "$.inputs.input"),
        ),
        (
            {"inputs": {"input": tensor_from_array(np.full(64, math.inf, np.float32))}},
            ("non_finite", "$.inputs.input"),
        ),
        (
            {"inputs": {"input": tensor_from_array(np.full(64, -1, np.float32))}},
            ("out_of_range", "$.inputs.input"),
        ),
        (
            {"inputs": {"input": Tensor(dtype="float32", shape=[64], data=b"\x00" * 3)}},
            ("malformed", "$.inputs.input"),
        ),
    ],
    ids=["model", "version", "expired", "names", "dtype", "inf", "range", "buffer"],
)
def test_each_reason_names_the_field(fields: dict[str, object], expected: tuple[str, str]) -> None:
    assert verdict(**fields) == expected


@pytest.mark.parametrize(
    ("fields", "path"),
    [
        ({"created_at": math.nan}, "$.created_at"),
        ({"created_at": math.inf}, "$.created_at"),
        ({"created_at": -math.inf}, "$.created_at"),
        ({"created_at": 0.0}, "$.created_at"),
        ({"created_at": NOW * 1000}, "$.created_at"),  # milliseconds, not seconds
        ({"created_at": NOW + TIME_WINDOW_S + 1}, "$.created_at"),
        ({"deadline": math.nan}, "$.deadline"),
        ({"deadline": math.inf}, "$.deadline"),
        ({"deadline": NOW + TIME_WINDOW_S + 1}, "$.deadline"),
        # a NaN created_at is refused whatever else is wrong: it must never reach a metric
        ({"created_at": math.nan, "model": "cats"}, "$.created_at"),
    ],
)
def test_times_must_be_finite_and_within_a_year(fields: dict[str, object], path: str) -> None:
    assert verdict(**fields) == ("malformed", path)


def test_times_at_the_edge_of_the_window_pass() -> None:
    edge = request(created_at=NOW - TIME_WINDOW_S, deadline=NOW + TIME_WINDOW_S)
    assert isinstance(validate_request(edge, CATALOG, now=NOW), Validated)


def test_a_deadline_long_past_is_expired_not_malformed() -> None:
    assert verdict(deadline=0.0) == ("expired", "$.deadline")


def test_invalid_paths_move_under_a_batch_prefix() -> None:
    assert Invalid("expired", "late", "$.deadline").path_under("$[3]") == "$[3].deadline"
    assert Invalid("malformed", "no").path_under("$[0]") == "$[0]"


@pytest.mark.parametrize(
    "value",
    [b"\xc1", b"\x91" * 5000 + b"\xc0", b"\x81\xa2id" + b"\x91" * 3000 + b"\xc0"],
    ids=["not-msgpack", "deep-array", "deep-field"],
)
def test_decoding_never_raises(value: bytes) -> None:
    result = decode_request(value)
    assert isinstance(result, Invalid)
    assert (result.reason, result.path) == ("malformed", "$")


def test_the_batch_check_agrees_with_the_exact_check() -> None:
    """numerically_clean may only say True where check_inputs finds nothing; on this batch
    of every kind of row it must say True exactly for the good ones."""
    spec = CATALOG.spec("digits")
    bad_values = [
        np.full(64, math.nan, np.float32),
        np.full(64, 17, np.float32),
        np.full(64, -0.5, np.float32),
    ]
    rows: list[dict[str, Tensor]] = [
        {"input": tensor_from_array(PIXELS)},
        *({"input": tensor_from_array(v)} for v in bad_values),
        {"input": tensor_from_array(PIXELS.astype(np.float64))},
        {"input": tensor_from_array(PIXELS[:8])},
        {"input": Tensor(dtype="float32", shape=[64], data=b"")},
        {"input": tensor_from_array(PIXELS), "extra": tensor_from_array(PIXELS)},
        {},
        {"input": tensor_from_array(holdout()[0][1])},
    ]
    clean = numerically_clean([(spec, inputs) for inputs in rows])
    exact = [check_inputs(spec, inputs) is None for inputs in rows]
    assert clean == exact == [True] + [False] * 8 + [True]

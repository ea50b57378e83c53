import math

import numpy as np
import pytest
from prometheus_client import CollectorRegistry

from schemas import Codec, ValidatedRequestV1, tensor_from_array
from schemas.models import ModelCatalog
from stages.metrics import PrometheusStageMetrics
from stages.validate import ValidateStage
from tests.helpers import MODELS, REQUESTS, digits_request, encode_raw, holdout, record

NOW = 1_700_000_000.0


@pytest.fixture(scope="module")
def stage() -> ValidateStage:
    return ValidateStage(catalog=ModelCatalog(MODELS), output_topic="validated", clock=lambda: NOW)


def _row() -> np.ndarray:
    return holdout()[0][0]


def test_good_request_is_validated_and_left_for_infer_to_route(stage: ValidateStage) -> None:
    request = digits_request(_row(), created_at=NOW - 1)
    outcome = stage.process([record(REQUESTS.encode(request))])
    assert outcome.rejected == []
    [output] = outcome.outputs
    assert output.topic == "validated"
    validated = Codec(ValidatedRequestV1).decode(output.value)
    assert validated.model_version is None  # no version named: infer routes it at batch time
    assert validated.validated_at == NOW
    assert validated.inputs == request.inputs
    headers = dict(output.headers)
    assert headers["schema"] == b"inference.validated/1"


def _bad(**fields: object) -> bytes:
    return REQUESTS.encode(digits_request(_row(), **{"created_at": NOW - 1, **fields}))


@pytest.mark.parametrize(
    ("value", "reason", "detail"),
    [
        (b"\x00garbage", "malformed", "not a valid inference.request/1"),
        (encode_raw({"id": "x", "model": "digits"}), "malformed", "`inputs`"),
        (_bad(model="nope"), "unknown_model", "unknown model 'nope' (known: "),
        (_bad(model_version="9"), "unknown_model", "no version '9'"),
        (_bad(deadline=NOW - 2), "expired", "deadline passed 2.000s"),
        (
            _bad(inputs={"pixels": tensor_from_array(_row())}),
            "signature_mismatch",
            "missing ['input'], unexpected ['pixels']",
        ),
        (
            _bad(inputs={"input": tensor_from_array(_row().astype(np.float64))}),
            "signature_mismatch",
            "must be float32, got float64",
        ),
        (
            _bad(inputs={"input": tensor_from_array(np.zeros((8, 8), np.float32))}),
            "signature_mismatch",
            "must have shape [64], got [8, 8]",
        ),
        (
            _bad(inputs={"input": tensor_from_array(np.full(64, math.nan, np.float32))}),
            "non_finite",
            "NaN or infinity",
        ),
        (
            _bad(inputs={"input": tensor_from_array(np.full(64, 99, np.float32))}),
            "out_of_range",
            "above the maximum 16.0",
        ),
        (
            encode_raw(
                {
                    "id": "x",
                    "model": "digits",
                    "created_at": NOW,
                    "inputs": {"input": {"dtype": "float32", "shape": [64], "data": b"12"}},
                }
            ),
            "malformed",
            "data has 2 bytes",
        ),
    ],
)
def test_bad_requests_are_rejected_with_a_reason(
    stage: ValidateStage, value: bytes, reason: str, detail: str
) -> None:
    outcome = stage.process([record(value)])
    assert outcome.outputs == []
    [rejection] = outcome.rejected
    assert rejection.reason == reason
    assert detail in rejection.detail
    assert rejection.record.value == value


def test_bad_records_do_not_affect_the_good_ones(stage: ValidateStage) -> None:
    good = [REQUESTS.encode(digits_request(x, created_at=NOW)) for x in holdout()[0][:5]]
    batch = [record(v, offset=i * 2) for i, v in enumerate(good)]
    batch += [record(b"junk", offset=i * 2 + 1) for i in range(5)]
    outcome = stage.process(batch)
    assert len(outcome.outputs) == 5
    assert sorted(r.record.offset for r in outcome.rejected) == [1, 3, 5, 7, 9]


def test_deadline_in_the_future_passes(stage: ValidateStage) -> None:
    outcome = stage.process([record(_bad(deadline=NOW + 5))])
    assert len(outcome.outputs) == 1


@pytest.mark.parametrize(
    ("fields", "detail"),
    [
        ({"created_at": math.nan}, "created_at must be finite"),
        ({"created_at": NOW * 1000}, "is more than a year from now"),
        ({"deadline": math.inf}, "deadline must be finite"),
    ],
)
def test_absurd_times_are_malformed(stage: ValidateStage, fields: dict, detail: str) -> None:
    [rejection] = stage.process([record(_bad(**fields))]).rejected
    assert (rejection.reason, detail in rejection.detail) == ("malformed", True), rejection


def test_a_record_nested_too_deeply_is_malformed(stage: ValidateStage) -> None:
    deep = b"\x84\xa2id\xa1x\xa5model\xa6digits\xaacreated_at\xcb" + b"\x00" * 8
    deep += b"\xa6inputs" + b"\x81\xa1a" * 3000 + b"\xc0"
    [rejection] = stage.process([record(deep), record(_bad())]).rejected
    assert rejection.reason == "malformed"


def test_a_nan_latency_never_reaches_the_end_to_end_histogram() -> None:
    registry = CollectorRegistry()
    metrics = PrometheusStageMetrics(stage="persist", registry=registry)
    metrics.end_to_end(math.nan)
    metrics.end_to_end(0.5)
    labels = {"stage": "persist"}
    assert registry.get_sample_value("streaminfer_end_to_end_latency_seconds_sum", labels) == 0.5


def test_a_named_version_is_kept_and_must_be_loaded_when_the_control_plane_says() -> None:
    """With a control plane, validate refuses a version no worker keeps loaded (the reason
    infer would give), and passes a loaded one through unchanged."""
    loaded = {"digits": ["1"]}
    stage = ValidateStage(
        catalog=ModelCatalog(MODELS),
        output_topic="validated",
        clock=lambda: NOW,
        loaded_versions=lambda spec: loaded[spec.name],
    )
    named = [digits_request(_row(), created_at=NOW - 1, model_version=v) for v in ("1", "2")]
    outcome = stage.process([record(REQUESTS.encode(r), offset=i) for i, r in enumerate(named)])
    [output] = outcome.outputs
    assert Codec(ValidatedRequestV1).decode(output.value).model_version == "1"
    [rejection] = outcome.rejected
    assert (rejection.record.offset, rejection.reason) == (1, "unknown_model")
    assert "version '2' of model 'digits' is not loaded (loaded: 1)" in rejection.detail

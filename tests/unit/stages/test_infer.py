"""The infer stage: one run per (model, version) per batch, routing, shadow, hostile records."""

from __future__ import annotations

import math
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest

from schemas import Codec, ResultV1, ValidatedRequestV1, tensor_from_array, tensor_to_array
from schemas.control import ModelState, default_state, route, shadow, unload
from stages.control import ControlPlane
from stages.fleet import ModelFleet
from stages.infer import InferStage
from stages.models import ModelRegistry
from stages.records import Record
from tests.helpers import MODELS, encode_raw, holdout, record
from tests.model_repo import digits_repository

VALIDATED = Codec(ValidatedRequestV1)
RESULTS = Codec(ResultV1)


def _validated(x: np.ndarray, i: int, **fields: Any) -> bytes:
    return VALIDATED.encode(
        ValidatedRequestV1(
            id=f"r{i}",
            model=str(fields.pop("model", "digits")),
            inputs=fields.pop("inputs", {"input": tensor_from_array(x)}),
            created_at=fields.pop("created_at", 1.0),
            validated_at=2.0,
            **fields,
        )
    )


class CountingRegistry(ModelRegistry):
    """The real registry; counts session.run calls per version (warm-ups included)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        self.runs: Counter[str] = Counter()
        self.batch_sizes: list[int] = []

    def open_session(self, name: str, version: str, **options: Any) -> ort.InferenceSession:
        real = super().open_session(name, version, **options)
        registry = self

        class Counting:
            def run(self, names: Any, feeds: dict[str, np.ndarray]) -> Any:
                registry.runs[version] += 1
                registry.batch_sizes.append(len(next(iter(feeds.values()))))
                return real.run(names, feeds)

        return Counting()  # type: ignore[return-value]


def _control() -> ControlPlane:
    def no_consumer() -> Any:
        raise AssertionError("unit tests never read Kafka")

    return ControlPlane(consumer_factory=no_consumer, topic="models")


@pytest.fixture()
def repo(tmp_path: Path) -> Path:
    return digits_repository(tmp_path, real=False)


def _stage(registry: ModelRegistry, control: ControlPlane | None = None) -> InferStage:
    fleet = ModelFleet(registry=registry, control=control)
    fleet.converge()
    return InferStage(fleet=fleet, output_topic="results", shadow_topic="shadow", clock=lambda: 3.0)


def _set(control: ControlPlane, registry: ModelRegistry, change: Any, **kw: Any) -> ModelState:
    spec = registry.spec("digits")
    state = change(control.state("digits") or default_state(spec), spec, now=1.0, **kw)
    control.apply("digits", state)
    return state


def test_results_equal_running_the_onnx_model_directly() -> None:
    registry = CountingRegistry(root=MODELS)
    features, labels = holdout()
    stage = InferStage(registry=registry, output_topic="results", clock=lambda: 3.0)
    batch = [record(_validated(x, i, model_version="1"), offset=i) for i, x in enumerate(features)]
    stage.process(batch[:1])  # loads the fleet (and warms each version once)
    registry.runs.clear()
    outcome = stage.process(batch)
    assert outcome.rejected == []
    assert registry.runs == {"1": 1}  # one session.run for the whole batch
    direct = ort.InferenceSession(str(MODELS / "digits" / "1" / "model.onnx"))
    expected_labels, expected_probs = direct.run(None, {"input": features})
    results = [RESULTS.decode(o.value) for o in outcome.outputs]
    assert [r.id for r in results] == [f"r{i}" for i in range(len(features))]
    for i, result in enumerate(results):
        assert (result.label, result.model_version) == (str(expected_labels[i]), "1")
        np.testing.assert_allclose(
            tensor_to_array(result.outputs["probabilities"]), expected_probs[i], rtol=1e-6
        )
        assert result.scores is not None
        assert max(result.scores, key=result.scores.__getitem__) == result.label
        assert result.timings == {"validated": 2.0, "inferred": 3.0}
    accuracy = np.mean([r.label == str(y) for r, y in zip(results, labels, strict=True)])
    assert accuracy > 0.95


def test_malformed_record_is_rejected_and_the_rest_inferred(repo: Path) -> None:
    features, _ = holdout()
    stage = _stage(CountingRegistry(root=repo))
    batch = [record(_validated(features[0], 0)), record(b"\x92junk", offset=1)]
    batch.append(record(_validated(features[1], 2), offset=2))
    outcome = stage.process(batch)
    assert [RESULTS.decode(o.value).id for o in outcome.outputs] == ["r0", "r2"]
    [rejection] = outcome.rejected
    assert (rejection.reason, rejection.record.offset) == ("malformed", 1)


def _hostile() -> dict[str, tuple[bytes, str]]:
    """Records validate would never emit, each with the reason infer must give."""
    x = holdout()[0][0]
    int8 = {"input": tensor_from_array(x.astype(np.int8))}
    short = {"input": tensor_from_array(x[:3])}
    raw = {"dtype": "float32", "shape": [64], "data": b"\x00" * 10}
    nan = np.array(x, copy=True)
    nan[5] = np.nan
    return {
        "int8": (_validated(x, 90, inputs=int8), "signature_mismatch"),
        "shape": (_validated(x, 91, inputs=short), "signature_mismatch"),
        "buffer": (
            encode_raw(
                {
                    "id": "r92",
                    "model": "digits",
                    "inputs": {"input": raw},
                    "created_at": 1.0,
                    "validated_at": 2.0,
                }
            ),
            "malformed",
        ),
        "nan_created_at": (_validated(x, 93, created_at=math.nan), "malformed"),
        "nan_input": (_validated(x, 94, inputs={"input": tensor_from_array(nan)}), "non_finite"),
        "unknown_model": (_validated(x, 95, model="cats"), "unknown_model"),
    }


@pytest.mark.parametrize("kind", sorted(_hostile()))
def test_a_hostile_validated_record_gets_the_same_verdict_alone_or_in_a_batch(
    repo: Path, kind: str
) -> None:
    """Issue 11: the verdict on a record must not depend on what else is in its batch."""
    value, reason = _hostile()[kind]
    features, _ = holdout()
    stage = _stage(CountingRegistry(root=repo))
    good = [record(_validated(features[i], i), offset=i) for i in range(20)]
    alone = stage.process([record(value, offset=99)])
    mixed = stage.process([*good[:10], record(value, offset=99), *good[10:]])
    for outcome in (alone, mixed):
        [rejection] = outcome.rejected
        assert (rejection.record.offset, rejection.reason) == (99, reason)
    assert len(mixed.outputs) == 20


def test_a_request_the_model_cannot_run_is_isolated(repo: Path) -> None:
    """A run that raises is replayed one record at a time: only the culprit is dead."""
    features, _ = holdout()
    registry = CountingRegistry(root=repo)
    stage = _stage(registry)
    real_run = stage._run

    def run_failing_for_r1(plan: Any, version: str, requests: list[Any]) -> Any:
        if any(r.id == "r1" for r in requests):
            raise RuntimeError("boom")
        return real_run(plan, version, requests)

    stage._run = run_failing_for_r1  # type: ignore[method-assign]
    batch = [record(_validated(features[i], i), offset=i) for i in range(3)]
    outcome = stage.process(batch)
    assert [RESULTS.decode(o.value).id for o in outcome.outputs] == ["r0", "r2"]
    [rejection] = outcome.rejected
    assert (rejection.reason, rejection.record.offset) == ("inference_error", 1)


def test_a_named_version_is_served_by_it_or_dead_lettered_when_not_loaded(repo: Path) -> None:
    features, _ = holdout()
    registry = CountingRegistry(root=repo)
    stage = _stage(registry)  # policy: version 1 only
    batch = [
        record(_validated(features[0], 0, model_version="1"), offset=0),
        record(_validated(features[1], 1, model_version="2"), offset=1),
    ]
    outcome = stage.process(batch)
    assert [RESULTS.decode(o.value).model_version for o in outcome.outputs] == ["1"]
    [rejection] = outcome.rejected
    assert (rejection.record.offset, rejection.reason) == (1, "unknown_model")
    assert "version '2' of model 'digits' is not loaded (loaded: 1)" in rejection.detail


def _keyed(features: np.ndarray, count: int, keys: int) -> list[Record]:
    return [
        Record(
            topic="validated",
            partition=0,
            offset=i,
            key=f"customer-{i % keys}".encode(),
            value=_validated(features[i % len(features)], i),
        )
        for i in range(count)
    ]


def test_a_weighted_split_is_sticky_per_key_and_runs_once_per_version(repo: Path) -> None:
    features, _ = holdout()
    registry = CountingRegistry(root=repo)
    control = _control()
    stage = _stage(registry, control)
    _set(control, registry, route, weights={"1": 90, "2": 10})
    stage._fleet.converge()
    registry.runs.clear()
    batch = _keyed(features, 1000, keys=1000)  # within max_batch_size (1024)
    outcome = stage.process(batch)
    assert outcome.rejected == []
    assert registry.runs == {"1": 1, "2": 1}
    versions: dict[bytes | None, set[str]] = {}
    for output in outcome.outputs:
        versions.setdefault(output.key, set()).add(RESULTS.decode(output.value).model_version)
    assert all(len(v) == 1 for v in versions.values())  # a key never sees two versions
    share = sum("2" in v for v in versions.values()) / len(versions)
    assert 0.07 <= share <= 0.13
    again = stage.process(batch[:50])  # the same keys, a later batch: the same versions
    for output in again.outputs:
        assert {RESULTS.decode(output.value).model_version} == versions[output.key]


def test_the_shadow_runs_on_the_same_batch_and_writes_only_to_the_shadow_topic(
    repo: Path,
) -> None:
    features, _ = holdout()
    registry = CountingRegistry(root=repo)
    control = _control()
    stage = _stage(registry, control)
    _set(control, registry, shadow, version="2")
    stage._fleet.converge()
    registry.runs.clear()
    outcome = stage.process(_keyed(features, 100, keys=100))
    assert registry.runs == {"1": 1, "2": 1}
    by_topic: dict[str, list[ResultV1]] = {}
    for output in outcome.outputs:
        by_topic.setdefault(output.topic, []).append(RESULTS.decode(output.value))
    assert {r.model_version for r in by_topic["results"]} == {"1"}
    assert {r.model_version for r in by_topic["shadow"]} == {"2"}
    assert [r.id for r in by_topic["shadow"]] == [r.id for r in by_topic["results"]]


def test_a_swap_happens_between_batches_and_the_old_session_waits_for_its_last_batch(
    repo: Path,
) -> None:
    features, _ = holdout()
    registry = CountingRegistry(root=repo)
    control = _control()
    fleet = ModelFleet(registry=registry, control=control)
    fleet.converge()
    stage = InferStage(fleet=fleet, output_topic="results")
    in_flight = fleet.lease()  # a batch that started before the command
    old = in_flight.plans["digits"].versions["1"]
    routed = _set(control, registry, route, weights={"2": 100})
    control.apply("digits", unload(routed, "1", now=2.0))
    fleet.converge()
    assert old.retired and old.session is not None  # still held by the batch in flight
    assert in_flight.plans["digits"].route(b"k") == "1"  # that batch keeps its routing
    outcome = stage.process(_keyed(features, 10, keys=10))  # a batch after the switch
    assert {RESULTS.decode(o.value).model_version for o in outcome.outputs} == {"2"}
    in_flight.release()
    assert old.session is None  # released with the last batch holding it


def test_preferred_batch_sizes_pad_the_run_and_return_only_real_rows(tmp_path: Path) -> None:
    repo = digits_repository(
        tmp_path, real=False, batching={"max_batch_size": 64, "preferred_batch_sizes": [8, 32]}
    )
    features, _ = holdout()
    registry = CountingRegistry(root=repo)
    stage = _stage(registry)
    registry.batch_sizes.clear()
    outcome = stage.process(_keyed(features, 70, keys=70))
    assert len(outcome.outputs) == 70 and outcome.rejected == []
    assert registry.batch_sizes == [64, 8]  # 64 (max_batch_size), then 6 rows padded to 8


def test_the_batch_reaches_the_session_as_one_writable_array_row_for_row() -> None:
    seen: list[np.ndarray] = []

    class Capturing(ModelRegistry):
        def open_session(self, name: str, version: str, **options: Any) -> Any:
            real = super().open_session(name, version, **options)

            class Session:
                def run(self, names: Any, feeds: dict[str, np.ndarray]) -> Any:
                    seen.append(feeds["input"])
                    return real.run(names, feeds)

            return Session()

    features, _ = holdout()
    stage = InferStage(registry=Capturing(root=MODELS), output_topic="results", clock=lambda: 3.0)
    batch = [record(_validated(x, i), offset=i) for i, x in enumerate(features[:7])]
    stage.process(batch[:1])  # loads the fleet
    seen.clear()
    assert stage.process(batch).rejected == []
    [stacked] = seen
    np.testing.assert_array_equal(stacked, features[:7])
    assert stacked.dtype == np.float32 and stacked.flags.writeable  # a processor may write it

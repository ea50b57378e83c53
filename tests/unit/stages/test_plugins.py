"""Pre/post-processing plugins (stages/plugins.py) and the built-in tabular processors."""

from __future__ import annotations

import shutil
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest
import yaml

from processors.tabular import DecisionThreshold, NamedFeatures, feature_key
from schemas import Codec, RequestV1, ResultV1, ValidatedRequestV1, tensor_from_array
from schemas.models import ModelCatalog
from schemas.processors import ProcessorSpec, model_processors
from schemas.tensors import tensor_to_array
from schemas.validation import validate_request
from stages.infer import InferStage
from stages.metrics import NullMetrics
from stages.models import ModelRegistry
from stages.plugins import (
    ENTRY_POINT_GROUP,
    Arrays,
    Batch,
    Processed,
    Processor,
    ProcessorChain,
    ProcessorLoadError,
    StageProcessors,
    check_processors,
    load_processor,
    resolve,
)
from stages.validate import ValidateStage
from tests.helpers import CANCER, MODELS, cancer_policy, holdout, record

HERE = "tests.unit.stages.test_plugins"
REQUESTS = Codec(RequestV1)
VALIDATED = Codec(ValidatedRequestV1)
RESULTS = Codec(ResultV1)
FEATURES, THRESHOLD = cancer_policy()


# --- plugins used by the tests (loaded by dotted path and by entry point) ---------------------


class Doubler(Processor):
    """preprocess: doubles every input; raises for a request whose attribute poison is set."""

    def load(self, config: Mapping[str, Any]) -> None:
        self.factor = float(config.get("factor", 2.0))

    def preprocess(self, batch: Batch) -> Processed:
        if any("poison" in r.attributes for r in batch.requests):
            raise ValueError("poisoned request")
        return Processed(arrays={k: v * self.factor for k, v in batch.arrays.items()})


class FailOn(Processor):
    """postprocess: refuses (by its errors) the rows whose attribute refuse is set, and
    raises for those whose attribute raise is set; labels the others "ok"."""

    def postprocess(self, batch: Batch, outputs: Arrays) -> Processed:
        if any("raise" in r.attributes for r in batch.requests):
            raise RuntimeError("boom")
        errors = {i: "refused" for i, r in enumerate(batch.requests) if "refuse" in r.attributes}
        return Processed(arrays=outputs, labels=["ok"] * len(batch), errors=errors)


class WrongRows(Processor):
    def preprocess(self, batch: Batch) -> Processed:
        return Processed(arrays={k: v[:1] for k, v in batch.arrays.items()})


class NoHooks(Processor):
    pass


class CountingMetrics(NullMetrics):
    def __init__(self) -> None:
        self.runs: list[tuple[str, str, str, int]] = []

    def processor_run(
        self, *, model: str, processor: str, hook: str, rows: int, seconds: float
    ) -> None:
        assert seconds >= 0
        self.runs.append((model, processor, hook, rows))


def _validated(i: int, x: np.ndarray, **attributes: str) -> ValidatedRequestV1:
    return ValidatedRequestV1(
        id=f"r{i}",
        model="digits",
        model_version="1",
        inputs={"input": tensor_from_array(x)},
        created_at=1.0,
        validated_at=2.0,
        attributes=attributes,
    )


def _batch(n: int, poisoned: int | None = None) -> Batch:
    features, _ = holdout()
    requests = [
        _validated(i, features[i], **({"poison": "1"} if i == poisoned else {})) for i in range(n)
    ]
    return Batch(requests, {"input": features[:n].copy()})


# --- loading ---------------------------------------------------------------------------------


@pytest.mark.parametrize("use", [f"{HERE}:Doubler", f"{HERE}.Doubler"])
def test_a_dotted_path_names_the_class(use: str) -> None:
    assert resolve(use) is Doubler
    loaded = load_processor(ProcessorSpec("double", use, {"factor": 3}), "infer")
    assert isinstance(loaded, Doubler) and loaded.factor == 3.0  # load() got the config


def test_an_entry_point_names_the_class(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # A distribution installed on sys.path that declares a processor in the group.
    dist = tmp_path / "acme_plugins-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: acme-plugins\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text(f"[{ENTRY_POINT_GROUP}]\nacme_fail = {HERE}:FailOn\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert resolve("acme_fail") is FailOn
    assert isinstance(load_processor(ProcessorSpec("f", "acme_fail"), "infer"), FailOn)


def test_the_built_in_processors_are_declared_as_entry_points() -> None:
    pyproject = (MODELS.parent / "pyproject.toml").read_text()
    assert 'named_features = "processors.tabular:NamedFeatures"' in pyproject
    assert 'decision_threshold = "processors.tabular:DecisionThreshold"' in pyproject


@pytest.mark.parametrize(
    ("use", "stage", "message"),
    [
        ("no_such_plugin", "infer", "neither an entry point"),
        ("no_such_module:Thing", "infer", "cannot import"),
        (f"{HERE}:HERE", "infer", "not a class"),
        (f"{HERE}:NoHooks", "infer", "implements no preprocess or postprocess"),
        (f"{HERE}:Doubler", "validate", "implements no parse"),
        ("processors.tabular:NamedFeatures", "validate", "failed to load"),  # no features
    ],
)
def test_a_processor_that_cannot_be_loaded_says_why(use: str, stage: Any, message: str) -> None:
    with pytest.raises(ProcessorLoadError, match=message):
        load_processor(ProcessorSpec("p", use), stage)


def test_the_model_yaml_section_is_parsed_and_checked() -> None:
    parsed = model_processors(
        {"validate": [{"use": "a.b:NamedFeatures", "config": {"x": 1}}], "infer": []}
    )
    assert parsed.parses_inputs and parsed.infer == ()
    assert parsed.validate[0].name == "NamedFeatures" and parsed.validate[0].config == {"x": 1}
    assert not model_processors(None).parses_inputs
    for bad in (
        {"validat": []},
        {"infer": [{"name": "p"}]},  # no use
        {"infer": [{"use": "a:B", "name": "has space"}]},
        {"infer": [{"use": "a:B", "name": "p"}, {"use": "a:C", "name": "p"}]},
        {"infer": [{"use": "a:B", "config": [1]}]},
    ):
        with pytest.raises(ValueError):
            model_processors(bad)


def test_check_processors_reports_what_cannot_be_loaded(tmp_path: Path) -> None:
    assert check_processors(ModelCatalog(MODELS).spec("breast_cancer")) == []
    root = _digits_repository(
        tmp_path,
        validate=[{"name": "wrong_stage", "use": f"{HERE}:Doubler"}],
        infer=[{"name": "fine", "use": f"{HERE}:Doubler"}, {"name": "gone", "use": "x:Y"}],
    )
    problems = check_processors(ModelCatalog(root).spec("digits"))
    assert len(problems) == 2
    assert problems[0].startswith("processors.validate 'wrong_stage'")
    assert problems[1].startswith("processors.infer 'gone'")


def test_an_unloadable_processor_fails_only_its_models_rows(tmp_path: Path) -> None:
    root = _digits_repository(tmp_path, infer=[{"name": "gone", "use": "nowhere:Thing"}])
    spec = ModelCatalog(root).spec("digits")
    processors = StageProcessors("infer")
    applied = processors.around(spec, _batch(3), lambda feeds: {"x": feeds["input"]})
    assert applied.rows == []
    assert {reason for reason, _ in applied.rejected.values()} == {"stage_error"}
    assert "cannot be loaded" in applied.rejected[0][1]


# --- error isolation and timings --------------------------------------------------------------


def _chain(*processors: tuple[str, Any]) -> tuple[ProcessorChain, CountingMetrics]:
    metrics = CountingMetrics()
    return ProcessorChain("digits", list(processors), metrics=metrics), metrics


def test_a_hook_that_raises_for_one_row_refuses_that_row_only() -> None:
    doubler = Doubler()
    doubler.load({})
    chain, metrics = _chain(("double", doubler))
    batch = _batch(5, poisoned=2)
    runs: list[int] = []

    def run(feeds: Arrays) -> Arrays:
        runs.append(len(feeds["input"]))
        return {"out": feeds["input"].sum(axis=1, keepdims=True)}

    applied = chain.around(batch, run)
    assert runs == [4]  # one model run for the rows left: the batch stays a batch
    assert list(applied.rows) == [0, 1, 3, 4]
    assert applied.rejected.keys() == {2}
    reason, detail = applied.rejected[2]
    assert reason == "preprocess_error" and "poisoned request" in detail and "double" in detail
    expected = 2 * batch.arrays["input"][[0, 1, 3, 4]].sum(axis=1, keepdims=True)
    np.testing.assert_allclose(applied.arrays["out"], expected)
    assert set(applied.timings) == {"double.preprocess_s"}
    # the failed batch call, then one call per row, all timed as one hook run
    assert metrics.runs == [("digits", "double", "preprocess", 5)]


def test_errors_a_hook_returns_refuse_rows_and_labels_follow_the_rows_kept() -> None:
    chain, _ = _chain(("fail", FailOn()))
    features, _ = holdout()
    requests = [
        _validated(0, features[0]),
        _validated(1, features[1], refuse="1"),
        _validated(2, features[2], **{"raise": "1"}),
        _validated(3, features[3]),
    ]
    applied = chain.around(
        Batch(requests, {"input": features[:4]}), lambda feeds: {"y": feeds["input"][:, :2]}
    )
    assert list(applied.rows) == [0, 3]
    assert {i: reason for i, (reason, _) in applied.rejected.items()} == {
        1: "postprocess_error",
        2: "postprocess_error",
    }
    assert "refused" in applied.rejected[1][1] and "boom" in applied.rejected[2][1]
    assert applied.labels == ["ok", "ok"]
    np.testing.assert_array_equal(applied.arrays["y"], features[[0, 3], :2])


def test_an_answer_with_the_wrong_number_of_rows_refuses_the_batch() -> None:
    chain, _ = _chain(("wrong", WrongRows()))
    applied = chain.around(_batch(3), lambda feeds: pytest.fail("must not run"))
    assert applied.rows == []
    assert all("answered a batch of 3 rows wrongly" in d for _, d in applied.rejected.values())


# --- in the stages ----------------------------------------------------------------------------


def _digits_repository(root: Path, **processors: list[dict[str, Any]]) -> Path:
    """A model repository at ``root`` holding digits v1 with a ``processors`` section."""
    raw = yaml.safe_load((MODELS / "digits" / "model.yaml").read_text())
    raw["processors"] = processors
    raw["versions"] = {"1": raw["versions"]["1"]}
    (root / "digits").mkdir()
    shutil.copytree(MODELS / "digits" / "1", root / "digits" / "1")
    (root / "digits" / "model.yaml").write_text(yaml.safe_dump(raw))
    return root


def test_infer_dead_letters_the_row_a_plugin_refuses_and_serves_the_rest(tmp_path: Path) -> None:
    root = _digits_repository(tmp_path, infer=[{"name": "fail", "use": f"{HERE}:FailOn"}])
    features, _ = holdout()
    metrics = CountingMetrics()
    stage = InferStage(registry=ModelRegistry(root=root), output_topic="results", metrics=metrics)
    batch = [
        record(
            VALIDATED.encode(_validated(i, features[i], **({"raise": "1"} if i == 2 else {}))),
            offset=i,
        )
        for i in range(6)
    ]
    outcome = stage.process(batch)
    [rejection] = outcome.rejected
    assert (rejection.record.offset, rejection.reason) == (2, "postprocess_error")
    results = [RESULTS.decode(o.value) for o in outcome.outputs]
    assert [r.id for r in results] == ["r0", "r1", "r3", "r4", "r5"]
    assert {r.label for r in results} == {"ok"}  # the plugin's labels
    assert all(r.timings["fail.postprocess_s"] >= 0 for r in results)
    assert ("digits", "fail", "postprocess", 6) in metrics.runs


def _cancer_request(i: int, x: np.ndarray, form: str = "inputs") -> RequestV1:
    if form == "inputs":  # each feature a scalar tensor named by the feature
        inputs = {f: tensor_from_array(np.float64(v)) for f, v in zip(FEATURES, x, strict=True)}
        return RequestV1(id=f"c{i}", model="breast_cancer", inputs=inputs, created_at=time.time())
    attributes = {f.replace("_", " "): repr(float(v)) for f, v in zip(FEATURES, x, strict=True)}
    return RequestV1(
        id=f"c{i}", model="breast_cancer", inputs={}, created_at=time.time(), attributes=attributes
    )


def _cancer_holdout() -> tuple[np.ndarray, np.ndarray]:
    with np.load(CANCER / "holdout.npz") as data:
        return data["X"], data["y"]


def test_breast_cancer_by_feature_name_through_validate_and_infer() -> None:
    x, y = _cancer_holdout()
    requests = [_cancer_request(i, x[i], "inputs" if i % 2 else "attributes") for i in range(40)]
    missing = _cancer_request(40, x[40])
    missing.inputs.pop("mean_area")
    unknown = _cancer_request(41, x[41])
    unknown.inputs["mean_radiuss"] = unknown.inputs["mean_radius"]
    negative = _cancer_request(42, -x[42])  # parsed, then refused by the declared min
    records = [record(REQUESTS.encode(r), offset=i) for i, r in enumerate(requests)]
    records += [
        record(REQUESTS.encode(r), offset=40 + i)
        for i, r in enumerate((missing, unknown, negative))
    ]
    metrics = CountingMetrics()
    validate = ValidateStage(
        catalog=ModelCatalog(MODELS),
        output_topic="validated",
        processors=StageProcessors("validate", metrics=metrics),
    )
    validated = validate.process(records)
    assert {r.record.offset: r.reason for r in validated.rejected} == {
        40: "parse_error",
        41: "parse_error",
        42: "out_of_range",
    }
    assert "mean_area" in next(r.detail for r in validated.rejected if r.record.offset == 40)
    assert metrics.runs == [("breast_cancer", "features", "parse", 43)]
    messages = [VALIDATED.decode(o.value) for o in validated.outputs]
    assert len(messages) == 40
    for i, message in enumerate(messages):
        np.testing.assert_array_equal(tensor_to_array(message.inputs["input"]), x[i])
        assert message.timings["features.parse_s"] > 0

    stage = InferStage(registry=ModelRegistry(root=MODELS), output_topic="results")
    inferred = stage.process([record(o.value, offset=i) for i, o in enumerate(validated.outputs)])
    assert inferred.rejected == []
    results = [RESULTS.decode(o.value) for o in inferred.outputs]
    direct = ort.InferenceSession(str(CANCER / "1" / "model.onnx"))
    _, probabilities = direct.run(None, {"input": x[:40]})
    expected = np.where(probabilities[:, 0] >= THRESHOLD, "malignant", "benign")
    assert [r.label for r in results] == expected.tolist()
    assert all(set(r.timings) >= {"features.parse_s", "threshold.postprocess_s"} for r in results)
    accuracy = np.mean(
        [r.label == ("malignant", "benign")[t] for r, t in zip(results, y[:40], strict=True)]
    )
    assert accuracy > 0.9


def test_the_door_lets_named_features_through_for_validate_to_parse() -> None:
    x, _ = _cancer_holdout()
    catalog = ModelCatalog(MODELS)
    assert catalog.spec("breast_cancer").processors.parses_inputs
    checked = validate_request(_cancer_request(0, x[0]), catalog, now=time.time())
    assert checked.__class__.__name__ == "Validated"


# --- the built-in tabular processors ----------------------------------------------------------


def _features(config: dict[str, Any] | None = None) -> NamedFeatures:
    processor = NamedFeatures()
    processor.load(config or {"features": ["Mean Radius", "texture", "area"], "dtype": "float32"})
    return processor


def _request(inputs: dict[str, Any], attributes: dict[str, str] | None = None) -> RequestV1:
    tensors = {k: tensor_from_array(np.asarray(v)) for k, v in inputs.items()}
    return RequestV1(id="x", model="m", inputs=tensors, created_at=0.0, attributes=attributes or {})


def test_named_features_reads_inputs_then_attributes_in_declared_order() -> None:
    parsed = _features().parse(
        Batch(
            [
                _request({"area": 3.0, "mean-radius": 1.0, "Texture": np.float32(2.0)}),
                _request({"mean_radius": [1.5]}, {"texture": "2.5", "area": "3.5", "other": "x"}),
                _request({"input": np.array([7.0, 8.0, 9.0])}),  # the vector itself
                _request({"area": 3.0, "mean_radius": 1.0}),  # texture missing
                _request({"area": 3.0, "mean_radius": 1.0, "colour": 2.0}),  # unknown name
                _request({"area": [1.0, 2.0], "mean_radius": 1.0, "texture": 1.0}),
                _request({"mean_radius": 1.0}, {"texture": "two", "area": "3"}),
                _request({"mean radius": 1.0, "mean_radius": 1.0, "texture": 1, "area": 1}),
            ]
        )
    )
    values = parsed.arrays["input"]
    assert values.dtype == np.float32 and values.shape == (8, 3)
    np.testing.assert_array_equal(values[:3], [[1, 2, 3], [1.5, 2.5, 3.5], [7, 8, 9]])
    assert set(parsed.errors) == {3, 4, 5, 6, 7}
    assert "missing 1 features: ['texture']" in parsed.errors[3]
    assert "unknown features ['colour']" in parsed.errors[4]
    assert "one number" in parsed.errors[5]
    assert "not a number" in parsed.errors[6]
    assert "twice" in parsed.errors[7]
    assert feature_key(" Mean-Concave  Points ") == "mean_concave_points"


def test_decision_threshold_names_the_positive_label_from_the_threshold_on() -> None:
    processor = DecisionThreshold()
    processor.load(
        {
            "scores": "p",
            "labels": ["malignant", "benign"],
            "positive": "malignant",
            "threshold": 0.3,
        }
    )
    p = np.array([[0.29, 0.71], [0.3, 0.7], [0.9, 0.1]], dtype=np.float32)
    done = processor.postprocess(Batch([]), {"p": p})
    assert done.labels == ["benign", "malignant", "malignant"]
    assert done.arrays["p"] is p  # scores untouched
    with pytest.raises(ValueError):
        DecisionThreshold().load({"scores": "p", "labels": ["a"], "positive": "a", "threshold": 1})
    with pytest.raises(ValueError):
        DecisionThreshold().load(
            {"scores": "p", "labels": ["a", "b"], "positive": "a", "threshold": 1.5}
        )


def test_named_features_fast_path_agrees_with_the_exact_one_across_dtypes() -> None:
    processor = _features({"features": ["a", "b", "c"], "dtype": "float64"})
    rows = [
        _request({"a": np.float32(1.5), "b": np.float32(2), "c": np.float32(3)}),
        _request({"a": np.float64(0.1), "b": np.float64(0.2), "c": [np.float64(0.3)]}),
        _request({"a": np.int64(7), "b": np.int64(8), "c": np.int64(9)}),
        _request({"a": np.float32(1), "b": np.float64(2), "c": np.int32(3)}),  # mixed: exact
        _request({"A": 4.0, "b": 5.0, "c": 6.0}),  # another spelling: exact
        _request({"a": np.float32(1), "b": np.float32(2), "d": np.float32(3)}),  # unknown d
    ]
    parsed = processor.parse(Batch(rows))
    np.testing.assert_array_equal(
        parsed.arrays["input"][:5],
        np.array([[1.5, 2, 3], [0.1, 0.2, 0.3], [7, 8, 9], [1, 2, 3], [4, 5, 6]]),
    )
    assert parsed.errors.keys() == {5}

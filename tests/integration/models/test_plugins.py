"""Pre/post-processing plugins in the real stage processes, on the real broker and Redis."""

from __future__ import annotations

import shutil
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest
import yaml

from kafkaio.produce import RequestProducer
from schemas import Codec, ResultV1, StoredV1, ValidatedRequestV1
from streaminfer.kafka import make_producer
from streaminfer.settings import Settings
from tests.fixtures import StageProcesses, read_topic
from tests.helpers import CANCER, MODELS, cancer_policy, digits_request, holdout
from tests.integration.ingest.fixtures import serving

pytestmark = pytest.mark.integration
RESULTS = Codec(ResultV1)
VALIDATED = Codec(ValidatedRequestV1)
FEATURES, THRESHOLD = cancer_policy()


def _repository_with_poison_plugin(root: Path) -> Path:
    """digits v1 with two postprocess processors: BatchSize, then RaiseOnPoison."""
    raw = yaml.safe_load((MODELS / "digits" / "model.yaml").read_text())
    raw["versions"] = {"1": raw["versions"]["1"]}
    plugins = "tests.integration.models.plugins"
    raw["processors"] = {
        "infer": [
            {"name": "size", "use": f"{plugins}:BatchSize"},
            {"name": "poison", "use": f"{plugins}:RaiseOnPoison"},
        ]
    }
    (root / "digits").mkdir(parents=True)
    shutil.copytree(MODELS / "digits" / "1", root / "digits" / "1")
    (root / "digits" / "model.yaml").write_text(yaml.safe_dump(raw))
    return root


def test_a_plugin_that_raises_for_one_record_dead_letters_it_and_serves_the_rest(
    settings: Settings, stages: StageProcesses, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(
        "STREAMINFER_MODELS_DIR", str(_repository_with_poison_plugin(tmp_path / "m"))
    )
    features, _ = holdout()
    ids = [f"p-{i}" for i in range(300)]
    sender = RequestProducer(producer=make_producer(settings), topic=settings.topics.requests)
    for i, request_id in enumerate(ids):  # all in Kafka before the stages start: full batches
        attributes = {"poison": "yes"} if i == 150 else {}
        sender.send(
            digits_request(
                features[i % len(features)], request_id=request_id, attributes=attributes
            )
        )
    assert sender.flush() == 0
    stages.start("validate")
    stages.start("infer")

    [dead] = read_topic(settings, settings.topics.dlq, count=1)
    headers = dict(dead.headers())
    assert (headers["dlq.stage"], headers["dlq.reason"]) == (b"infer", b"postprocess_error")
    assert b"this request is poison" in headers["dlq.error"]
    assert VALIDATED.decode(dead.value()).id == "p-150"  # the record as infer consumed it

    served = [
        RESULTS.decode(m.value()) for m in read_topic(settings, settings.topics.results, count=299)
    ]
    assert Counter(r.id for r in served) == Counter(i for i in ids if i != "p-150")
    assert all({"size.postprocess_s", "poison.postprocess_s"} <= set(r.timings) for r in served)
    # BatchSize saw the rows together (one session.run for them, micro-batching kept);
    # RaiseOnPoison raised for the batch, so it was called again row by row.
    sizes = Counter(r.label for r in served)
    assert sum(sizes.values()) == 299 and all(n > 1 for n in map(_rows, sizes))


def _rows(label: str | None) -> int:
    assert label is not None and label.startswith("rows=")
    return int(label.removeprefix("rows="))


def _by_name(i: int, x: np.ndarray) -> dict[str, Any]:
    """A JSON request giving the 30 features by name: as one-value inputs, or (odd rows) as
    attributes with the dataset's spelling ("mean radius")."""
    body: dict[str, Any] = {"id": f"bc-{i}", "model": "breast_cancer"}
    if i % 2 == 0:
        body["inputs"] = {f: [float(v)] for f, v in zip(FEATURES, x, strict=True)}
    else:
        body["inputs"] = {}
        named = zip(FEATURES, x, strict=True)
        body["attributes"] = {f.replace("_", " "): str(float(v)) for f, v in named}
    return body


def test_breast_cancer_by_feature_name_over_http_names_the_class(
    settings: Settings, stages: StageProcesses
) -> None:
    with np.load(CANCER / "holdout.npz") as data:
        x, y = data["X"], data["y"]
    session = ort.InferenceSession(str(CANCER / "1" / "model.onnx"))
    _, probabilities = session.run(None, {"input": x})
    expected = np.where(probabilities[:, 0] >= THRESHOLD, "malignant", "benign")
    stages.start_pipeline()
    with serving(settings) as api:
        response = api.post("/v1/requests", json=[_by_name(i, row) for i, row in enumerate(x)])
        assert response.status_code == 202, response.text

        one = api.post("/v1/predict", params={"timeout": 30}, json=_by_name(1000, x[0]))
        assert one.status_code == 200, one.text
        assert one.json()["label"] == expected[0]

        incomplete = _by_name(1001, x[1])
        incomplete["attributes"].pop("worst area")
        refused = api.post("/v1/predict", params={"timeout": 30}, json=incomplete)
        assert refused.status_code == 422, refused.text
        answer = refused.json()
        assert (answer["reason"], answer["stage"]) == ("parse_error", "validate")

        # Every result stored (and the predict's), then read back over HTTP.
        stored = read_topic(settings, settings.topics.stored, count=len(x) + 1)
        stored_ids = {Codec(StoredV1).decode(m.value()).id for m in stored}
        assert stored_ids == {f"bc-{i}" for i in [*range(len(x)), 1000]}
        results = [api.get(f"/v1/results/bc-{i}").json() for i in range(len(x))]
    assert [r["label"] for r in results] == expected.tolist()
    timed = [{"features.parse_s", "threshold.postprocess_s"} <= set(r["timings"]) for r in results]
    assert all(timed)
    accuracy = float(np.mean(expected == np.array(["malignant", "benign"])[y]))
    assert accuracy > 0.93

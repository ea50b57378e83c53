import numpy as np
import onnxruntime as ort
import pytest

from schemas import Codec, ResultV1, ValidatedRequestV1, tensor_from_array, tensor_to_array
from stages.infer import InferStage
from stages.models import ModelRegistry
from tests.helpers import MODELS, holdout, record

VALIDATED = Codec(ValidatedRequestV1)
RESULTS = Codec(ResultV1)


def _validated(x: np.ndarray, i: int, **fields: object) -> bytes:
    return VALIDATED.encode(
        ValidatedRequestV1(
            id=f"r{i}",
            model=str(fields.get("model", "digits")),
            model_version="1",
            inputs={"input": tensor_from_array(x)},
            created_at=1.0,
            validated_at=2.0,
        )
    )


class CountingRegistry(ModelRegistry):
    """The real registry, counting session.run calls through a thin session wrapper."""

    runs = 0

    def session(self, name: str, version: str) -> ort.InferenceSession:
        real = super().session(name, version)
        registry = self

        class Counting:
            def run(self, *args: object) -> object:
                registry.runs += 1
                return real.run(*args)

        return Counting()  # type: ignore[return-value]


@pytest.fixture()
def registry() -> CountingRegistry:
    return CountingRegistry(root=MODELS)


def test_results_equal_running_the_onnx_model_directly(registry: CountingRegistry) -> None:
    features, labels = holdout()
    stage = InferStage(registry=registry, output_topic="results", clock=lambda: 3.0)
    outcome = stage.process([record(_validated(x, i), offset=i) for i, x in enumerate(features)])
    assert outcome.rejected == []
    assert registry.runs == 1  # one session.run for the whole batch
    direct = ort.InferenceSession(str(MODELS / "digits" / "1" / "model.onnx"))
    expected_labels, expected_probs = direct.run(None, {"input": features})
    results = [RESULTS.decode(o.value) for o in outcome.outputs]
    assert [r.id for r in results] == [f"r{i}" for i in range(len(features))]
    for i, result in enumerate(results):
        assert result.label == str(expected_labels[i])
        np.testing.assert_allclose(
            tensor_to_array(result.outputs["probabilities"]), expected_probs[i], rtol=1e-6
        )
        assert result.scores is not None
        assert max(result.scores, key=result.scores.__getitem__) == result.label
        assert result.timings == {"validated": 2.0, "inferred": 3.0}
    accuracy = np.mean([r.label == str(y) for r, y in zip(results, labels, strict=True)])
    assert accuracy > 0.95


def test_malformed_record_is_rejected_and_the_rest_inferred(registry: CountingRegistry) -> None:
    features, _ = holdout()
    stage = InferStage(registry=registry, output_topic="results")
    batch = [record(_validated(features[0], 0)), record(b"\x92junk", offset=1)]
    batch.append(record(_validated(features[1], 2), offset=2))
    outcome = stage.process(batch)
    assert [RESULTS.decode(o.value).id for o in outcome.outputs] == ["r0", "r2"]
    [rejection] = outcome.rejected
    assert (rejection.reason, rejection.record.offset) == ("malformed", 1)


def test_a_request_the_model_cannot_run_is_isolated(registry: CountingRegistry) -> None:
    features, _ = holdout()
    wrong = VALIDATED.encode(
        ValidatedRequestV1(
            id="bad",
            model="digits",
            model_version="1",
            inputs={"input": tensor_from_array(np.zeros(3, np.float32))},
            created_at=1.0,
            validated_at=2.0,
        )
    )
    stage = InferStage(registry=registry, output_topic="results")
    batch = [record(_validated(features[0], 0)), record(wrong, offset=1)]
    outcome = stage.process(batch)
    assert [RESULTS.decode(o.value).id for o in outcome.outputs] == ["r0"]
    [rejection] = outcome.rejected
    assert rejection.reason == "inference_error"

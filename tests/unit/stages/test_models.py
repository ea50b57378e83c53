from pathlib import Path

import pytest

from stages.models import ModelRegistry, UnknownModel, load_spec
from tests.helpers import MODELS


def test_digits_contract_matches_the_onnx_file() -> None:
    registry = ModelRegistry(root=MODELS)
    spec = registry.spec("digits")
    assert [(i.name, i.dtype, i.shape) for i in spec.inputs] == [("input", "float32", (64,))]
    assert spec.labels == tuple(str(d) for d in range(10))
    session = registry.session("digits", spec.resolve_version(None))
    assert [i.name for i in session.get_inputs()] == ["input"]
    assert {o.name for o in session.get_outputs()} == {o.name for o in spec.outputs}


def test_unknown_model_and_version_name_what_exists() -> None:
    registry = ModelRegistry(root=MODELS)
    with pytest.raises(UnknownModel, match=r"known: digits"):
        registry.spec("cats")
    with pytest.raises(UnknownModel, match=r"no version '7' \(known: 1\)"):
        registry.spec("digits").resolve_version("7")


def test_malformed_contract_names_the_file(tmp_path: Path) -> None:
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "model.yaml").write_text("name: m\n")
    with pytest.raises(ValueError, match=r"m/model.yaml: malformed"):
        load_spec(tmp_path / "m")

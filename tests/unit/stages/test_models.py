"""Model contracts (schemas.models) and the ONNX Runtime registry built on them."""

import subprocess
import sys
from pathlib import Path

import pytest

from schemas.models import ModelCatalog, UnknownModel, load_spec
from stages.models import ModelRegistry
from tests.helpers import MODELS


def test_digits_contract_matches_the_onnx_file() -> None:
    registry = ModelRegistry(root=MODELS)
    spec = registry.spec("digits")
    assert [(i.name, i.dtype, i.shape) for i in spec.inputs] == [("input", "float32", (64,))]
    assert spec.labels == tuple(str(d) for d in range(10))
    assert registry.catalog.spec("digits") == spec
    session = registry.session("digits", spec.resolve_version(None))
    assert [i.name for i in session.get_inputs()] == ["input"]
    assert {o.name for o in session.get_outputs()} == {o.name for o in spec.outputs}


def test_unknown_model_and_version_name_what_exists() -> None:
    catalog = ModelCatalog(MODELS)
    assert catalog.names() == ["digits"]
    with pytest.raises(UnknownModel, match=r"known: digits"):
        catalog.spec("cats")
    with pytest.raises(UnknownModel, match=r"no version '7' \(known: 1\)"):
        catalog.spec("digits").resolve_version("7")


def test_malformed_contract_names_the_file(tmp_path: Path) -> None:
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "model.yaml").write_text("name: m\n")
    with pytest.raises(ValueError, match=r"m/model.yaml: malformed"):
        load_spec(tmp_path / "m")


def test_a_contract_named_unlike_its_folder_is_refused(tmp_path: Path) -> None:
    (tmp_path / "other").mkdir()
    text = (MODELS / "digits" / "model.yaml").read_text()
    (tmp_path / "other" / "model.yaml").write_text(text)
    with pytest.raises(ValueError, match=r"differs from its folder"):
        ModelCatalog(tmp_path)


@pytest.mark.parametrize(
    "modules",
    ["backfill.plan, backfill.cli", "schemas.validation, ingest.payloads", "stages.validate"],
)
def test_checking_requests_does_not_load_onnx_runtime(modules: str) -> None:
    """Validate, ingest and the backfill CLI need only the contracts: ONNX Runtime (slow to
    import, large) stays out of those processes."""
    code = f'import sys, {modules}; assert "onnxruntime" not in sys.modules, "onnxruntime"'
    run = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False
    )
    assert run.returncode == 0, run.stderr

"""Model contracts (schemas.models) and the ONNX Runtime registry built on them."""

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from schemas.models import ModelCatalog, UnknownModel, VersionPolicy, load_spec
from stages.models import ModelRegistry, example_feeds, warm_up
from tests.helpers import MODELS
from tests.model_repo import add_version, digits_repository


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
    assert "digits" in catalog.names()
    with pytest.raises(UnknownModel, match=r"known: .*digits"):
        catalog.spec("cats")
    with pytest.raises(UnknownModel, match=r"no version '7' \(known: 1"):
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


@pytest.mark.parametrize(
    ("policy", "expected"),
    [
        (None, ["1", "10"]),  # latest 1 (10 > 2 > 1, numerically) plus default_version 1
        ({"latest": 2}, ["1", "2", "10"]),
        ({"specific": ["2"]}, ["1", "2"]),
    ],
)
def test_the_version_policy_picks_what_a_worker_loads(
    tmp_path: Path, policy: dict[str, object] | None, expected: list[str]
) -> None:
    root = digits_repository(tmp_path, versions=("1", "2", "10"), real=False)
    path = root / "digits" / "model.yaml"
    contract = yaml.safe_load(path.read_text())
    contract.pop("version_policy")
    if policy is not None:
        contract["version_policy"] = policy
    path.write_text(yaml.safe_dump(contract))
    assert ModelCatalog(root).spec("digits").policy_versions() == expected


def test_a_version_folder_dropped_in_later_is_found_on_reload(tmp_path: Path) -> None:
    root = digits_repository(tmp_path, versions=("1",), real=False)
    catalog = ModelCatalog(root)
    add_version(root, "3")
    assert sorted(catalog.spec("digits").versions) == ["1"]  # read once...
    assert sorted(catalog.reload("digits").versions) == ["1", "3"]  # ...until asked again
    assert catalog.spec("digits").versions["3"] == root / "digits" / "3" / "model.onnx"
    with pytest.raises(UnknownModel):
        catalog.reload("..")


def test_a_bad_version_policy_names_the_file(tmp_path: Path) -> None:
    root = digits_repository(tmp_path, versions=("1",), policy={"latest": 0}, real=False)
    with pytest.raises(ValueError, match=r"digits/model.yaml: malformed.*latest must be"):
        ModelCatalog(root)
    assert VersionPolicy(latest=3).select(["1", "2"]) == ["1", "2"]


def test_warm_up_runs_a_generated_example_within_the_declared_bounds() -> None:
    registry = ModelRegistry(root=MODELS)
    spec = registry.spec("digits")
    feeds = example_feeds(spec, rows=2)
    assert feeds["input"].shape == (2, 64) and feeds["input"].dtype.name == "float32"
    label, probabilities = warm_up(registry.open_session("digits", "1"), spec)
    assert label.shape == (1,) and probabilities.shape == (1, 10)

"""``streaminfer models``: validate a version folder, parse commands, the compare report."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from schemas import ResultV1
from streaminfer.cli import main
from streaminfer.models_cli import agreement_lines, parse_weights, validate_version
from tests.helpers import MODELS
from tests.model_repo import add_version, digits_repository


def test_a_good_version_folder_validates(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = digits_repository(tmp_path, versions=("1",), real=False)
    folder = add_version(root, "7")
    assert main(["models", "validate", str(folder)]) == 0
    out = capsys.readouterr().out
    assert "signature matches model.yaml" in out
    assert "one run on a generated batch of 2 succeeded: label [2], probabilities [2, 10]" in out


def test_a_version_with_another_signature_is_refused(tmp_path: Path) -> None:
    """A file built for another model (30 inputs, 2 classes) dropped in as digits/9."""
    root = digits_repository(tmp_path, versions=("1",), real=False)
    wrong = [p for p in MODELS.glob("*/1/model.onnx") if p.parent.parent.name != "digits"]
    if not wrong:
        pytest.skip("no second model in the repository")
    (root / "digits" / "9").mkdir()
    shutil.copyfile(wrong[0], root / "digits" / "9" / "model.onnx")
    lines: list[str] = []
    problems = validate_version(root / "digits" / "9", echo=lines.append)
    assert problems
    assert any("input: model.yaml shape" in p for p in problems), problems
    assert not any("succeeded" in line for line in lines)


def test_weights_parse_and_bad_ones_say_how_to_write_them() -> None:
    assert parse_weights(["1=95", "2=5"]) == {"1": 95, "2": 5}
    with pytest.raises(ValueError, match="VERSION=WEIGHT"):
        parse_weights(["2:5"])


def _result(id_: str, version: str, label: str, score: float) -> ResultV1:
    return ResultV1(
        id=id_,
        model="digits",
        model_version=version,
        status="ok",
        outputs={},
        created_at=1.0,
        label=label,
        scores={"a": score, "b": 1 - score},
    )


def test_the_compare_report_counts_agreement_and_score_difference() -> None:
    primaries = {f"r{i}": _result(f"r{i}", "1", "a", 0.9) for i in range(4)}
    shadows = {f"r{i}": _result(f"r{i}", "2", "a" if i else "b", 0.8) for i in range(5)}
    report = "\n".join(agreement_lines("digits", "2", 60, shadows, primaries))
    assert "shadow results       5" in report
    assert "with a primary       4 (primary versions 1: 4)" in report
    assert "label agreement      75.00% (3/4)" in report
    assert "mean |score diff|    0.1000" in report

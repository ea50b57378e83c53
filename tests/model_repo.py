"""A model repository of a test's own (``tmp_path``), so a test can add, load and unload
versions freely: ``digits`` with the versions asked for (version 1's ONNX file, or the
repository's real version of that name when it has one and ``real=True``)."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import yaml

from tests.helpers import MODELS


def digits_repository(
    root: Path,
    *,
    versions: tuple[str, ...] = ("1", "2"),
    policy: dict[str, Any] | None = None,
    batching: dict[str, Any] | None = None,
    real: bool = True,
) -> Path:
    """``root/digits`` with ``versions``; returns ``root``. ``policy`` is the
    ``version_policy`` (default: exactly version 1, so other versions load only when the
    control plane says so)."""
    contract = yaml.safe_load((MODELS / "digits" / "model.yaml").read_text())
    contract["versions"] = {v: {"file": "model.onnx"} for v in versions}
    contract["default_version"] = "1"
    contract["version_policy"] = policy or {"specific": ["1"]}
    if batching is not None:
        contract["batching"] = batching
    model_dir = root / "digits"
    for version in versions:
        source = MODELS / "digits" / version / "model.onnx"
        if not (real and source.is_file()):
            source = MODELS / "digits" / "1" / "model.onnx"
        (model_dir / version).mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, model_dir / version / "model.onnx")
    (model_dir / "model.yaml").write_text(yaml.safe_dump(contract, sort_keys=False))
    return root


def add_version(root: Path, version: str, *, source: str = "1") -> Path:
    """Drop a new version folder into ``root/digits`` (no yaml edit: found on disk)."""
    target = root / "digits" / version
    target.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(root / "digits" / source / "model.onnx", target / "model.onnx")
    return target

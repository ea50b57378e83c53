"""Model contracts: ``models/<name>/model.yaml`` (inputs, outputs, labels, versions).

Everything that checks a request against a model -- the validate stage, the HTTP ingest, the
backfill CLI -- needs only these contracts, never the model files, so they live here, free of
ONNX Runtime. :class:`stages.models.ModelRegistry` opens the sessions on top of a
:class:`ModelCatalog`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


class UnknownModel(LookupError):
    """No such model, or no such version of it."""


@dataclass(frozen=True, slots=True)
class TensorSpec:
    """One input or output: name, dtype and per-example shape (batch dimension excluded)."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    min: float | None = None
    max: float | None = None


@dataclass(frozen=True, slots=True)
class ModelSpec:
    """A model's contract, read from its ``model.yaml``."""

    name: str
    default_version: str
    versions: dict[str, Path]
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    labels: tuple[str, ...] = ()
    label_from: str | None = None
    max_batch_size: int = 1024

    def resolve_version(self, version: str | None) -> str:
        chosen = version or self.default_version
        if chosen not in self.versions:
            known = ", ".join(sorted(self.versions))
            raise UnknownModel(f"model {self.name!r} has no version {chosen!r} (known: {known})")
        return chosen


def _tensor_spec(raw: dict[str, Any]) -> TensorSpec:
    return TensorSpec(
        name=str(raw["name"]),
        dtype=str(raw["dtype"]),
        shape=tuple(int(d) for d in raw.get("shape", [])),
        min=None if raw.get("min") is None else float(raw["min"]),
        max=None if raw.get("max") is None else float(raw["max"]),
    )


def load_spec(model_dir: Path) -> ModelSpec:
    """Parse ``model_dir/model.yaml``; raises ``ValueError`` naming the file when malformed."""
    path = model_dir / "model.yaml"
    try:
        raw = yaml.safe_load(path.read_text())
        versions = {
            str(v): model_dir / str(v) / str(entry.get("file", "model.onnx"))
            for v, entry in raw["versions"].items()
        }
        return ModelSpec(
            name=str(raw["name"]),
            default_version=str(raw["default_version"]),
            versions=versions,
            inputs=tuple(_tensor_spec(i) for i in raw["inputs"]),
            outputs=tuple(_tensor_spec(o) for o in raw["outputs"]),
            labels=tuple(str(label) for label in raw.get("labels") or ()),
            label_from=(raw.get("postprocess") or {}).get("label_from"),
            max_batch_size=int((raw.get("batching") or {}).get("max_batch_size", 1024)),
        )
    except (KeyError, TypeError, AttributeError, yaml.YAMLError) as exc:
        raise ValueError(f"{path}: malformed model contract ({exc!r})") from exc


@dataclass
class ModelCatalog:
    """The contract of every model under ``root`` (each ``*/model.yaml``), read once."""

    root: Path
    _specs: dict[str, ModelSpec] = field(default_factory=dict, init=False, repr=False)

    def __post_init__(self) -> None:
        for yaml_path in sorted(self.root.glob("*/model.yaml")):
            spec = load_spec(yaml_path.parent)
            if spec.name != yaml_path.parent.name:
                raise ValueError(f"{yaml_path}: name {spec.name!r} differs from its folder")
            self._specs[spec.name] = spec

    def names(self) -> list[str]:
        return sorted(self._specs)

    def spec(self, name: str) -> ModelSpec:
        """The contract of ``name``; :class:`UnknownModel` naming the known ones."""
        try:
            return self._specs[name]
        except KeyError:
            known = ", ".join(self.names()) or "none"
            raise UnknownModel(f"unknown model {name!r} (known: {known})") from None

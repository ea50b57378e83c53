"""Model repository: ``models/<name>/model.yaml`` plus ``models/<name>/<version>/model.onnx``.

:class:`ModelRegistry` reads the contracts (input signature, outputs, labels) and opens one
ONNX Runtime session per model version on first use. The validate stage only needs the
contracts; the infer stage also needs sessions.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import onnxruntime as ort
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


@dataclass(frozen=True, slots=True)
class SessionOptions:
    """ONNX Runtime knobs. Spinning is off by default: a stage shares its core with others."""

    intra_op_threads: int = 1
    allow_spinning: bool = False


@dataclass
class ModelRegistry:
    """Every model under ``root``; sessions opened lazily, one per (model, version)."""

    root: Path
    session_options: SessionOptions = field(default_factory=SessionOptions)
    _specs: dict[str, ModelSpec] = field(default_factory=dict, init=False)
    _sessions: dict[tuple[str, str], ort.InferenceSession] = field(default_factory=dict, init=False)

    def __post_init__(self) -> None:
        for yaml_path in sorted(self.root.glob("*/model.yaml")):
            spec = load_spec(yaml_path.parent)
            if spec.name != yaml_path.parent.name:
                raise ValueError(f"{yaml_path}: name {spec.name!r} differs from its folder")
            self._specs[spec.name] = spec

    def names(self) -> list[str]:
        return sorted(self._specs)

    def spec(self, name: str) -> ModelSpec:
        try:
            return self._specs[name]
        except KeyError:
            known = ", ".join(self.names()) or "none"
            raise UnknownModel(f"unknown model {name!r} (known: {known})") from None

    def session(self, name: str, version: str) -> ort.InferenceSession:
        key = (name, version)
        if key not in self._sessions:
            path = self.spec(name).versions[version]
            self._sessions[key] = ort.InferenceSession(
                str(path), sess_options=self._ort_options(), providers=["CPUExecutionProvider"]
            )
        return self._sessions[key]

    def _ort_options(self) -> ort.SessionOptions:
        options = ort.SessionOptions()
        options.intra_op_num_threads = self.session_options.intra_op_threads
        options.inter_op_num_threads = 1
        spinning = "1" if self.session_options.allow_spinning else "0"
        options.add_session_config_entry("session.intra_op.allow_spinning", spinning)
        options.add_session_config_entry("session.inter_op.allow_spinning", spinning)
        return options

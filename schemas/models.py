"""Model contracts: ``models/<name>/model.yaml`` (inputs, outputs, labels, versions).

Everything that checks a request against a model -- the validate stage, the HTTP ingest, the
backfill CLI -- needs only these contracts, never the model files, so they live here, free of
ONNX Runtime. :class:`stages.models.ModelRegistry` opens the sessions on top of a
:class:`ModelCatalog`.

Repository layout: ``<root>/<name>/model.yaml`` plus one folder per version,
``<root>/<name>/<version>/model.onnx`` (or the file ``versions.<v>.file`` names). A version is
the union of the entries under ``versions:`` and the version folders holding a
``model.onnx``, so a new version can be dropped in, checked (``streaminfer models validate``)
and loaded without editing the yaml. ``version_policy`` (``{latest: N}`` or
``{specific: [...]}``, default ``latest: 1``) says which versions a worker loads when the
control plane holds no state for the model; ``default_version`` is always loaded too.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from schemas.processors import ModelProcessors, model_processors


class UnknownModel(LookupError):
    """No such model, or no such version of it."""


def version_order(version: str) -> tuple[int, int, str]:
    """Sort key of version names: numbers numerically (``2 < 10``), then the others by name."""
    return (0, int(version), "") if version.isdigit() else (1, 0, version)


@dataclass(frozen=True, slots=True)
class VersionPolicy:
    """Which versions to load when no control-plane state says otherwise: the ``latest`` N
    (by :func:`version_order`), or exactly the ``specific`` ones."""

    latest: int | None = 1
    specific: tuple[str, ...] = ()

    def select(self, versions: Iterable[str]) -> list[str]:
        ordered = sorted(versions, key=version_order)
        if self.specific:
            return [v for v in ordered if v in self.specific]
        return ordered[-(self.latest or 1) :]

    def describe(self) -> str:
        return f"specific {list(self.specific)}" if self.specific else f"latest {self.latest}"


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
    max_queue_delay_ms: float | None = None
    preferred_batch_sizes: tuple[int, ...] = ()
    intra_op_threads: int | None = None
    version_policy: VersionPolicy = field(default_factory=VersionPolicy)
    processors: ModelProcessors = field(default_factory=ModelProcessors)  # stages.plugins

    def policy_versions(self) -> list[str]:
        """The versions a worker loads when no control-plane state names any: the policy's
        choice plus ``default_version``."""
        chosen = set(self.version_policy.select(self.versions)) | {self.default_version}
        return sorted(chosen & self.versions.keys(), key=version_order)

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


def _policy(raw: dict[str, Any] | None) -> VersionPolicy:
    if not raw:
        return VersionPolicy()
    if "specific" in raw:
        specific = tuple(str(v) for v in raw["specific"])
        if not specific:
            raise ValueError("version_policy.specific lists no version")
        return VersionPolicy(latest=None, specific=specific)
    latest = int(raw["latest"])
    if latest < 1:
        raise ValueError(f"version_policy.latest must be at least 1, got {latest}")
    return VersionPolicy(latest=latest)


def _versions(model_dir: Path, raw: dict[str, Any] | None) -> dict[str, Path]:
    """The ``versions:`` entries, plus every version folder holding a ``model.onnx``."""
    versions = {
        str(v): model_dir / str(v) / str((entry or {}).get("file", "model.onnx"))
        for v, entry in (raw or {}).items()
    }
    for onnx in sorted(model_dir.glob("*/model.onnx")):
        versions.setdefault(onnx.parent.name, onnx)
    return versions


def load_spec(model_dir: Path) -> ModelSpec:
    """Parse ``model_dir/model.yaml``; raises ``ValueError`` naming the file when malformed."""
    path = model_dir / "model.yaml"
    try:
        raw = yaml.safe_load(path.read_text())
        batching = raw.get("batching") or {}
        threads = (raw.get("runtime") or {}).get("intra_op_threads")
        delay = batching.get("max_queue_delay_ms")
        return ModelSpec(
            name=str(raw["name"]),
            default_version=str(raw["default_version"]),
            versions=_versions(model_dir, raw.get("versions")),
            inputs=tuple(_tensor_spec(i) for i in raw["inputs"]),
            outputs=tuple(_tensor_spec(o) for o in raw["outputs"]),
            labels=tuple(str(label) for label in raw.get("labels") or ()),
            label_from=(raw.get("postprocess") or {}).get("label_from"),
            max_batch_size=int(batching.get("max_batch_size", 1024)),
            max_queue_delay_ms=None if delay is None else float(delay),
            preferred_batch_sizes=tuple(
                sorted(int(n) for n in batching.get("preferred_batch_sizes") or ())
            ),
            intra_op_threads=None if threads is None else int(threads),
            version_policy=_policy(raw.get("version_policy")),
            processors=model_processors(raw.get("processors")),
        )
    except (KeyError, TypeError, AttributeError, ValueError, yaml.YAMLError) as exc:
        raise ValueError(f"{path}: malformed model contract ({exc!r})") from exc


@dataclass
class ModelCatalog:
    """The contract of every model under ``root`` (each ``*/model.yaml``), read once."""

    root: Path
    _specs: dict[str, ModelSpec] = field(default_factory=dict, init=False, repr=False)

    def __post_init__(self) -> None:
        for yaml_path in sorted(self.root.glob("*/model.yaml")):
            self._read(yaml_path.parent)

    def _read(self, model_dir: Path) -> ModelSpec:
        spec = load_spec(model_dir)
        if spec.name != model_dir.name:
            raise ValueError(
                f"{model_dir / 'model.yaml'}: name {spec.name!r} differs from its folder"
            )
        self._specs[spec.name] = spec
        return spec

    def reload(self, name: str) -> ModelSpec:
        """Read ``name``'s contract and version folders again (a version added since): the
        control plane may name a version this process has not seen yet."""
        model_dir = self.root / name
        if name in {".", ".."} or not (model_dir / "model.yaml").is_file():
            return self.spec(name)  # raises UnknownModel for a model that never existed
        return self._read(model_dir)

    def names(self) -> list[str]:
        return sorted(self._specs)

    def spec(self, name: str) -> ModelSpec:
        """The contract of ``name``; :class:`UnknownModel` naming the known ones."""
        try:
            return self._specs[name]
        except KeyError:
            known = ", ".join(self.names()) or "none"
            raise UnknownModel(f"unknown model {name!r} (known: {known})") from None

"""ONNX Runtime sessions for the models of a :class:`~schemas.models.ModelCatalog`.

The contracts (input signature, outputs, labels) live in :mod:`schemas.models`, free of ONNX
Runtime; :class:`ModelRegistry` adds one session per model version, opened on first use. Only
the infer stage needs it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import onnxruntime as ort

from schemas.models import ModelCatalog, ModelSpec


@dataclass(frozen=True, slots=True)
class SessionOptions:
    """ONNX Runtime knobs. Spinning is off by default: a stage shares its core with others."""

    intra_op_threads: int = 1
    allow_spinning: bool = False


@dataclass
class ModelRegistry:
    """Every model under ``root`` (its :attr:`catalog`); sessions opened lazily, one per
    (model, version)."""

    root: Path
    session_options: SessionOptions = field(default_factory=SessionOptions)
    catalog: ModelCatalog = field(init=False)
    _sessions: dict[tuple[str, str], ort.InferenceSession] = field(default_factory=dict, init=False)

    def __post_init__(self) -> None:
        self.catalog = ModelCatalog(self.root)

    def names(self) -> list[str]:
        return self.catalog.names()

    def spec(self, name: str) -> ModelSpec:
        return self.catalog.spec(name)

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

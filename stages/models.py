"""ONNX Runtime sessions for the models of a :class:`~schemas.models.ModelCatalog`.

The contracts (input signature, outputs, labels) live in :mod:`schemas.models`, free of ONNX
Runtime; :class:`ModelRegistry` adds one session per model version, opened on first use. Only
the infer stage needs it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
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
        """A session of ``name``/``version``, opened once and cached."""
        key = (name, version)
        if key not in self._sessions:
            self._sessions[key] = self.open_session(name, version)
        return self._sessions[key]

    def open_session(
        self, name: str, version: str, *, intra_op_threads: int | None = None
    ) -> ort.InferenceSession:
        """A new session of ``name``/``version`` (not cached: the fleet owns its sessions)."""
        path = self.spec(name).versions[version]
        return ort.InferenceSession(
            str(path),
            sess_options=self._ort_options(intra_op_threads),
            providers=["CPUExecutionProvider"],
        )

    def _ort_options(self, intra_op_threads: int | None = None) -> ort.SessionOptions:
        options = ort.SessionOptions()
        threads = self.session_options.intra_op_threads
        options.intra_op_num_threads = threads if intra_op_threads is None else intra_op_threads
        options.inter_op_num_threads = 1
        spinning = "1" if self.session_options.allow_spinning else "0"
        options.add_session_config_entry("session.intra_op.allow_spinning", spinning)
        options.add_session_config_entry("session.inter_op.allow_spinning", spinning)
        return options


def example_feeds(spec: ModelSpec, rows: int = 1) -> dict[str, npt.NDArray[Any]]:
    """A generated batch of ``rows`` examples that fits ``spec``'s inputs: each input's
    declared minimum when it has one (a value the model must accept), else zeros."""
    feeds: dict[str, npt.NDArray[Any]] = {}
    for tensor in spec.inputs:
        fill = tensor.min if tensor.min is not None else 0
        feeds[tensor.name] = np.full((rows, *tensor.shape), fill, dtype=np.dtype(tensor.dtype))
    return feeds


def warm_up(session: ort.InferenceSession, spec: ModelSpec) -> list[npt.NDArray[Any]]:
    """One run on a generated example (the first run of a session allocates and is slow;
    a version takes traffic only after it). Returns the outputs, in ``spec`` order."""
    names = [o.name for o in spec.outputs]
    outputs: list[npt.NDArray[Any]] = session.run(names, example_feeds(spec))
    return outputs

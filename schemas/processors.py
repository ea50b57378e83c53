"""The ``processors:`` section of a ``model.yaml``: which plugins shape a model's requests and
results, and where they run.

```yaml
processors:
  validate:                 # `parse` hooks, run by validate before the input checks
    - name: features        # the processor's label in timings and metrics
      use: processors.tabular:NamedFeatures   # a `module:Class` path, or an entry point name
      config: {...}         # handed to the processor's load(); free-form
  infer:                    # `preprocess` before session.run, `postprocess` after, in order
    - name: threshold
      use: decision_threshold                 # group `streaminfer.processors`
      config: {...}
```

Only the contract lives here (no imports of plugin code): :mod:`stages.plugins` resolves
``use`` and runs the hooks. A model with ``validate`` processors takes free-form inputs (e.g.
features by name) that only its parse hooks can turn into the declared tensors, so the
checks made before the validate stage (HTTP ingest, backfill) skip its input signature.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Final

PROCESSOR_NAME: Final = re.compile(r"[A-Za-z0-9_\-]{1,64}")
"""What a processor's ``name`` may be: it becomes a timings key and a metric label."""


@dataclass(frozen=True, slots=True)
class ProcessorSpec:
    """One configured processor: its ``name``, the plugin it ``use``\\ s and its ``config``."""

    name: str
    use: str
    config: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}))


@dataclass(frozen=True, slots=True)
class ModelProcessors:
    """A model's processors by the stage that runs them, in the order they run."""

    validate: tuple[ProcessorSpec, ...] = ()
    infer: tuple[ProcessorSpec, ...] = ()

    @property
    def parses_inputs(self) -> bool:
        """True when the request's inputs are the parse hooks' to turn into tensors."""
        return bool(self.validate)


def model_processors(raw: object) -> ModelProcessors:
    """Parse a ``processors:`` section; ``ValueError`` saying what is wrong."""
    if raw is None:
        return ModelProcessors()
    if not isinstance(raw, dict) or not set(raw) <= {"validate", "infer"}:
        raise ValueError("processors must be a mapping with the keys validate and/or infer")
    sections = {stage: _specs(stage, raw.get(stage)) for stage in ("validate", "infer")}
    names = [s.name for specs in sections.values() for s in specs]
    if len(set(names)) != len(names):
        raise ValueError(f"processor names must be unique within a model, got {names}")
    return ModelProcessors(**sections)


def _specs(stage: str, raw: object) -> tuple[ProcessorSpec, ...]:
    if raw is None:
        return ()
    if not isinstance(raw, list):
        raise ValueError(f"processors.{stage} must be a list")
    return tuple(_spec(f"processors.{stage}[{i}]", item) for i, item in enumerate(raw))


def _spec(where: str, raw: object) -> ProcessorSpec:
    if not isinstance(raw, dict) or not set(raw) <= {"name", "use", "config"}:
        raise ValueError(f"{where} must be a mapping with name, use and optional config")
    use, config = raw.get("use"), raw.get("config") or {}
    name = raw.get("name") or (use.rpartition(":")[2].rpartition(".")[2] if use else None)
    if not isinstance(use, str) or not use:
        raise ValueError(f"{where}.use must name a plugin (module:Class or an entry point)")
    if not isinstance(name, str) or PROCESSOR_NAME.fullmatch(name) is None:
        raise ValueError(f"{where}.name must match {PROCESSOR_NAME.pattern}, got {name!r}")
    if not isinstance(config, dict):
        raise ValueError(f"{where}.config must be a mapping")
    return ProcessorSpec(name=name, use=use, config=MappingProxyType(dict(config)))

"""The label distribution each model was trained on, as its build script records it in
``models/<name>/model.yaml``::

    training_label_distribution: {"0": 0.099, "1": 0.101, ...}   # the model's
    versions:
      "2":
        training_label_distribution: {...}                        # a version's own, if retrained

The drift of a window is measured against the version's own distribution when it has one,
else the model's.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Final

import yaml

KEY: Final = "training_label_distribution"
_NAME = re.compile(r"[A-Za-z0-9_\-][A-Za-z0-9_.\-]{0,127}")  # a model or version folder
log = logging.getLogger(__name__)


def parse_distribution(raw: object) -> dict[str, float] | None:
    """``{label: share}`` with labels as text; None when absent or unusable (not a mapping,
    a negative or non-finite share, nothing positive)."""
    if not isinstance(raw, Mapping):
        return None
    try:
        shares = {str(label): float(share) for label, share in raw.items()}
    except (TypeError, ValueError):
        return None
    if any(not math.isfinite(s) or s < 0 for s in shares.values()) or sum(shares.values()) <= 0:
        return None
    return shares


def distributions(contract: Mapping[str, Any]) -> dict[str | None, dict[str, float]]:
    """From one parsed ``model.yaml``: ``None`` -> the model's distribution, ``version`` ->
    a version's own. Entries without a usable distribution are left out."""
    found: dict[str | None, dict[str, float]] = {}
    model_wide = parse_distribution(contract.get(KEY))
    if model_wide is not None:
        found[None] = model_wide
    versions = contract.get("versions")
    for version, entry in versions.items() if isinstance(versions, Mapping) else []:
        own = parse_distribution(entry.get(KEY)) if isinstance(entry, Mapping) else None
        if own is not None:
            found[str(version)] = own
    return found


class TrainingDistributions:
    """Reads ``<models_dir>/<model>/model.yaml`` the first time a model is asked for."""

    def __init__(self, models_dir: Path) -> None:
        self._models_dir = models_dir
        self._by_model: dict[str, dict[str | None, dict[str, float]]] = {}

    def knows(self, model: str, version: str | None = None) -> bool:
        """Whether ``model`` (and ``version``) are in the repository: the names of a dead
        letter come from whatever a client sent, and only real ones may become labels."""
        if not _NAME.fullmatch(model) or (version is not None and not _NAME.fullmatch(version)):
            return False
        folder = self._models_dir / model
        if not (folder / "model.yaml").is_file():
            return False
        return version is None or (folder / version).is_dir()

    def get(self, model: str, version: str) -> dict[str, float] | None:
        if not _NAME.fullmatch(model):
            return None
        if model not in self._by_model:
            self._by_model[model] = self._read(model)
        known = self._by_model[model]
        return known.get(version) or known.get(None)

    def _read(self, model: str) -> dict[str | None, dict[str, float]]:
        path = self._models_dir / model / "model.yaml"
        try:
            contract = yaml.safe_load(path.read_text())
        except (OSError, yaml.YAMLError) as exc:
            log.warning("monitor: no training distribution for %s (%s): no drift score", model, exc)
            return {}
        found = distributions(contract) if isinstance(contract, Mapping) else {}
        if not found:
            log.warning("monitor: %s has no %s in %s: no drift score", model, KEY, path)
        return found

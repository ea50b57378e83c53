"""The control plane's message: the desired state of one model, on ``inference.models``.

``inference.models`` is a compacted topic: key = model name, value = the latest
:class:`ModelState` of that model (MessagePack, header ``schema`` =
``inference.model-state/1``), a tombstone (no value) = back to the repository's defaults.
``streaminfer models load|unload|route|promote|rollback|shadow|set`` write it; every validate
and infer worker reads it from the beginning and converges (see :mod:`stages.control` and
:mod:`stages.fleet`).

The transitions below are pure functions of a state, so that the CLI, the tests and the
workers agree on what a command means.
"""

from __future__ import annotations

from typing import Annotated

import msgspec
from msgspec import Meta, Struct

from schemas.models import ModelSpec, version_order

Version = Annotated[str, Meta(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.\-]+$")]
Weight = Annotated[int, Meta(ge=0, le=1_000_000)]
ModelName = Annotated[str, Meta(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9_.\-]+$")]


class ModelSettings(Struct, frozen=True, kw_only=True, omit_defaults=True):
    """Per-model serving settings; a field left ``None`` takes the value of ``model.yaml``
    (``batching.*``, ``runtime.intra_op_threads``), then the worker's settings."""

    max_batch_size: Annotated[int, Meta(ge=1)] | None = None
    max_queue_delay_ms: Annotated[float, Meta(ge=0)] | None = None
    preferred_batch_sizes: list[Annotated[int, Meta(ge=1)]] | None = None
    intra_op_threads: Annotated[int, Meta(ge=0)] | None = None


class ModelState(Struct, frozen=True, kw_only=True):
    """What every worker should serve for ``model``.

    ``loaded``: versions kept loaded (a request may name any of them explicitly).
    ``routing``: version -> weight for requests that name no version; a record key lands on
    a version by a stable hash, so a key sticks to its version while the routing holds.
    ``shadow``: a version that also runs on every batch, its results on
    ``inference.shadow`` only. ``previous_routing``: what ``rollback`` restores.
    ``revision`` grows by one per command; ``updated_at`` is epoch seconds.
    """

    model: ModelName
    loaded: list[Version]
    routing: dict[Version, Weight]
    revision: int
    updated_at: float
    shadow: Version | None = None
    previous_routing: dict[Version, Weight] | None = None
    settings: ModelSettings = msgspec.field(default_factory=ModelSettings)
    changed_by: str = ""

    def versions(self) -> list[str]:
        """Every version this state needs loaded: ``loaded``, the routed ones and the shadow."""
        needed = set(self.loaded) | {v for v, w in self.routing.items() if w > 0}
        if self.shadow is not None:
            needed.add(self.shadow)
        return sorted(needed, key=version_order)

    def routed(self) -> dict[str, int]:
        """The routing without zero weights, in version order."""
        ordered = sorted(self.routing, key=version_order)
        return {v: self.routing[v] for v in ordered if self.routing[v] > 0}


class InvalidChange(ValueError):
    """A control command that cannot apply to the current state (said in the message)."""


def default_state(spec: ModelSpec) -> ModelState:
    """The state of a model no command has touched: its version policy, all traffic to
    ``default_version``. Revision 0 (never written)."""
    return ModelState(
        model=spec.name,
        loaded=spec.policy_versions(),
        routing={spec.default_version: 100},
        revision=0,
        updated_at=0.0,
    )


def _next(state: ModelState, now: float, who: str, **changes: object) -> ModelState:
    return msgspec.structs.replace(
        state, revision=state.revision + 1, updated_at=now, changed_by=who, **changes
    )


def _known(spec: ModelSpec, versions: list[str]) -> None:
    unknown = sorted(set(versions) - spec.versions.keys(), key=version_order)
    if unknown:
        known = ", ".join(sorted(spec.versions, key=version_order))
        raise InvalidChange(f"model {spec.name!r} has no version {unknown} (known: {known})")


def load(
    state: ModelState, spec: ModelSpec, version: str, *, now: float, who: str = ""
) -> ModelState:
    """Keep ``version`` loaded (requests may then name it; traffic is unchanged)."""
    _known(spec, [version])
    loaded = sorted(set(state.loaded) | {version}, key=version_order)
    return _next(state, now, who, loaded=loaded)


def unload(state: ModelState, version: str, *, now: float, who: str = "") -> ModelState:
    """Stop keeping ``version`` loaded; refused while traffic or the shadow uses it."""
    if state.routed().get(version):
        raise InvalidChange(f"version {version} still takes traffic ({_fmt(state.routed())})")
    if state.shadow == version:
        raise InvalidChange(f"version {version} is the shadow; turn the shadow off first")
    if version not in state.loaded:
        raise InvalidChange(f"version {version} is not loaded (loaded: {state.loaded})")
    return _next(state, now, who, loaded=[v for v in state.loaded if v != version])


def route(
    state: ModelState, spec: ModelSpec, weights: dict[str, int], *, now: float, who: str = ""
) -> ModelState:
    """Split traffic by ``weights`` (relative, e.g. ``{"1": 95, "2": 5}``); the versions are
    loaded too. The current routing becomes the one ``rollback`` restores."""
    if not weights or sum(weights.values()) <= 0:
        raise InvalidChange("a routing needs at least one version with a positive weight")
    _known(spec, list(weights))
    loaded = sorted(set(state.loaded) | {v for v, w in weights.items() if w > 0}, key=version_order)
    return _next(
        state, now, who, routing=dict(weights), previous_routing=state.routing, loaded=loaded
    )


def promote(
    state: ModelState, spec: ModelSpec, version: str, *, now: float, who: str = ""
) -> ModelState:
    """All traffic to ``version`` (the shadow stops when it is the promoted version)."""
    routed = route(state, spec, {version: 100}, now=now, who=who)
    return routed if routed.shadow != version else msgspec.structs.replace(routed, shadow=None)


def rollback(state: ModelState, *, now: float, who: str = "") -> ModelState:
    """Back to the routing before the last ``route``/``promote`` (and that one becomes the
    previous, so a second rollback undoes the first)."""
    if state.previous_routing is None:
        raise InvalidChange(f"model {state.model!r} has no previous routing to roll back to")
    loaded = sorted(set(state.loaded) | set(state.previous_routing), key=version_order)
    return _next(
        state,
        now,
        who,
        routing=state.previous_routing,
        previous_routing=state.routing,
        loaded=loaded,
    )


def shadow(
    state: ModelState, spec: ModelSpec, version: str | None, *, now: float, who: str = ""
) -> ModelState:
    """Mirror every batch to ``version`` (None: no shadow)."""
    if version is not None:
        _known(spec, [version])
    return _next(state, now, who, shadow=version)


def configure(
    state: ModelState, settings: ModelSettings, *, now: float, who: str = ""
) -> ModelState:
    """Replace the fields of the per-model settings that ``settings`` sets."""
    merged = msgspec.structs.replace(
        state.settings,
        **{
            f: v for f in ModelSettings.__struct_fields__ if (v := getattr(settings, f)) is not None
        },
    )
    return _next(state, now, who, settings=merged)


def _fmt(routing: dict[str, int]) -> str:
    return " ".join(f"{v}={w}" for v, w in routing.items())

"""The infer stage's models as a live fleet: loaded sessions per (model, version), kept in
line with the control plane without a restart.

- **What to serve**, per model: its :class:`~schemas.control.ModelState` from the control
  plane, or, when no command touched it, the repository's version policy and all traffic to
  ``default_version``. A :class:`ModelPlan` is that state made servable: a loaded, warmed
  session for every version it names, the routing as cumulative hash buckets, the shadow,
  the effective batching settings.
- **Hot swap.** The loader thread wakes on every control-plane change, opens and warms the
  versions the new state needs (one run on a generated example) while the current plan keeps
  serving, and only then publishes the new plan, by replacing one reference. A batch takes
  a :class:`Lease` on the plans when it starts and uses them to its end, so a switch always
  falls between two batches. A version the new plan drops is *retired*: its session is
  released when the last batch holding it returns its lease (a count per version, so the
  release is deterministic and logged).
- **A failed load** (a corrupt file, a version missing on this worker) keeps the current
  plan of that model and says so in the log: traffic never moves to a version that cannot
  run.
- **Routing** (:func:`bucket_of`): a stable hash of the record key (or the request id) into
  :data:`BUCKETS` buckets, cut by the cumulative weights in version order. The same key
  lands on the same version for as long as the routing holds, and moving from 90/10 to
  95/5 moves only the keys of the buckets that change hands.
"""

from __future__ import annotations

import hashlib
import logging
import threading
from collections.abc import Iterator, Mapping
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from types import TracebackType
from typing import Final

import onnxruntime as ort

from schemas.control import ModelSettings, ModelState, default_state
from schemas.models import ModelCatalog, ModelSpec, UnknownModel
from stages.control import ControlPlane
from stages.models import ModelRegistry, warm_up

log = logging.getLogger(__name__)

BUCKETS: Final = 10_000
"""Routing resolution: a weight is honoured to 1/10,000 of the traffic."""


def bucket_of(key: bytes) -> int:
    """A record key's routing bucket in ``[0, BUCKETS)``: the same on every worker, every
    process and every run (a keyed hash, not Python's salted ``hash``)."""
    digest = hashlib.blake2b(key, digest_size=8).digest()
    return int.from_bytes(digest, "big") % BUCKETS


def cumulative_routes(routing: Mapping[str, int]) -> tuple[tuple[int, str], ...]:
    """``{"1": 90, "2": 10}`` -> ``((9000, "1"), (10000, "2"))``: each version's exclusive
    upper bucket, in the routing's (version) order."""
    total = sum(routing.values())
    routes: list[tuple[int, str]] = []
    running = 0
    for version, weight in routing.items():
        running += weight
        routes.append((round(running * BUCKETS / total), version))
    return tuple(routes)


@dataclass(frozen=True, slots=True)
class ServingSettings:
    """The settings in force for one model: the control plane's, else ``model.yaml``'s,
    else the worker's."""

    max_batch_size: int
    max_queue_delay_s: float | None
    preferred_batch_sizes: tuple[int, ...]
    intra_op_threads: int

    @classmethod
    def of(cls, spec: ModelSpec, chosen: ModelSettings, *, threads: int) -> ServingSettings:
        delay_ms = (
            chosen.max_queue_delay_ms
            if chosen.max_queue_delay_ms is not None
            else spec.max_queue_delay_ms
        )
        preferred = chosen.preferred_batch_sizes
        return cls(
            max_batch_size=chosen.max_batch_size or spec.max_batch_size,
            max_queue_delay_s=None if delay_ms is None else delay_ms / 1000,
            preferred_batch_sizes=tuple(sorted(preferred))
            if preferred is not None
            else spec.preferred_batch_sizes,
            intra_op_threads=_first(chosen.intra_op_threads, spec.intra_op_threads, threads),
        )

    def padded_size(self, rows: int) -> int:
        """The preferred batch size to pad ``rows`` to (the smallest that holds them), or
        ``rows`` when none is declared or none is large enough."""
        return next((n for n in self.preferred_batch_sizes if n >= rows), rows)


def _first(*values: int | None) -> int:
    return next(v for v in values if v is not None)


@dataclass(eq=False)
class LoadedVersion:
    """One open session and the number of batches holding it."""

    model: str
    version: str
    intra_op_threads: int
    session: ort.InferenceSession | None
    holders: int = 0
    retired: bool = False

    def release_if_unused(self) -> None:
        """Drop the session once retired and held by no batch (call with the fleet lock)."""
        if self.retired and self.holders == 0 and self.session is not None:
            self.session = None
            log.info("fleet: released %s/%s", self.model, self.version)


@dataclass(frozen=True, slots=True)
class ModelPlan:
    """What a batch serves for one model (immutable: a new state makes a new plan)."""

    spec: ModelSpec
    versions: Mapping[str, LoadedVersion]
    routes: tuple[tuple[int, str], ...]
    shadow: str | None
    settings: ServingSettings
    state: ModelState

    def route(self, key: bytes) -> str:
        """The version a request without an explicit version goes to."""
        bucket = bucket_of(key)
        for bound, version in self.routes:
            if bucket < bound:
                return version
        return self.routes[-1][1]

    def session(self, version: str) -> ort.InferenceSession:
        session = self.versions[version].session
        if session is None:  # a leased version is never released: a bug if it happens
            raise RuntimeError(f"{self.spec.name}/{version} was released while leased")
        return session


class Lease:
    """The plans a batch serves with, from its start to its end; holds their sessions."""

    def __init__(self, fleet: ModelFleet, plans: Mapping[str, ModelPlan]) -> None:
        self._fleet = fleet
        self.plans = plans
        self._held = {id(v): v for p in plans.values() for v in p.versions.values()}
        self._released = False

    def plan(self, model: str) -> ModelPlan | None:
        return self.plans.get(model)

    def held(self) -> list[LoadedVersion]:
        return list(self._held.values())

    def release(self) -> None:
        if not self._released:
            self._released = True
            self._fleet._give_back(self)

    def __enter__(self) -> Lease:
        return self

    def __exit__(
        self,
        _type: type[BaseException] | None,
        _value: BaseException | None,
        _tb: TracebackType | None,
    ) -> None:
        self.release()


@dataclass
class ModelFleet:
    """Every model's :class:`ModelPlan`, converging on the control plane (see the module
    docstring). Without a control plane it serves the repository's policy, loaded on the
    first :meth:`lease` (what unit tests and tools use)."""

    registry: ModelRegistry
    control: ControlPlane | None = None
    _plans: dict[str, ModelPlan] = field(default_factory=dict, init=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, init=False)
    _wake: threading.Event = field(default_factory=threading.Event, init=False)
    _stop: threading.Event = field(default_factory=threading.Event, init=False)
    _converged: bool = field(default=False, init=False)

    def __post_init__(self) -> None:
        if self.control is not None:
            self.control.subscribe(lambda _model: self._wake.set())

    @property
    def catalog(self) -> ModelCatalog:
        return self.registry.catalog

    def lease(self) -> Lease:
        """The current plans, held until :meth:`Lease.release` (use ``with``)."""
        if not self._converged:
            self.converge()
        with self._lock:
            lease = Lease(self, self._plans)
            for loaded in lease.held():
                loaded.holders += 1
        return lease

    def _give_back(self, lease: Lease) -> None:
        with self._lock:
            for loaded in lease.held():
                loaded.holders -= 1
                loaded.release_if_unused()

    def plans(self) -> dict[str, ModelPlan]:
        return dict(self._plans)

    def batch_timeout_s(self, default_s: float) -> float:
        """How long the runner may wait to fill a batch: the smallest ``max_queue_delay``
        of the models served (``default_s`` when none declares one)."""
        delays = [
            p.settings.max_queue_delay_s
            for p in self._plans.values()
            if p.settings.max_queue_delay_s is not None
        ]
        return min(delays, default=default_s)

    @contextmanager
    def running(self) -> Iterator[ModelFleet]:
        """Read the control plane, load what it says (before returning: a worker serves
        its first batch with the state in force when it started), and keep converging in
        a background thread while inside."""
        reading = self.control.running() if self.control is not None else nullcontext()
        with reading:
            self.converge()
            self._stop.clear()
            loader = threading.Thread(target=self._keep_converging, name="fleet", daemon=True)
            loader.start()
            try:
                yield self
            finally:
                self._stop.set()
                self._wake.set()
                loader.join(timeout=30)

    def _keep_converging(self) -> None:
        while not self._stop.is_set():
            self._wake.wait()
            self._wake.clear()
            if not self._stop.is_set():
                self.converge()

    def converge(self) -> None:
        """One pass: make every model's plan match its desired state."""
        self._converged = True
        names = set(self.catalog.names())
        if self.control is not None:
            names |= set(self.control.models())
        for name in sorted(names):
            try:
                self._converge_model(name)
            except Exception:  # one model's trouble must not keep the others from converging
                log.exception("fleet: %s could not be brought to its desired state", name)

    def _desired(self, name: str) -> tuple[ModelSpec, ModelState] | None:
        state = self.control.state(name) if self.control is not None else None
        try:
            spec = self.catalog.spec(name)
            if state is not None and set(state.versions()) - spec.versions.keys():
                spec = self.catalog.reload(name)  # a version added since this worker started
        except UnknownModel:
            log.error("fleet: the control plane names model %r, absent from the repository", name)
            return None
        return spec, state or default_state(spec)

    def _converge_model(self, name: str) -> None:
        desired = self._desired(name)
        if desired is None:
            return
        spec, state = desired
        current = self._plans.get(name)
        if current is not None and current.state == state and current.spec == spec:
            return
        if not state.routed():
            log.error("fleet: %s rev %d routes no traffic; ignored", name, state.revision)
            return
        threads = self.registry.session_options.intra_op_threads
        settings = ServingSettings.of(spec, state.settings, threads=threads)
        versions = self._load(spec, state, settings, current)
        if versions is None:
            return
        routing = state.routed()
        plan = ModelPlan(
            spec=spec,
            versions=versions,
            routes=cumulative_routes(routing),
            shadow=state.shadow,
            settings=settings,
            state=state,
        )
        self._publish(plan, current)

    def _load(
        self,
        spec: ModelSpec,
        state: ModelState,
        settings: ServingSettings,
        current: ModelPlan | None,
    ) -> dict[str, LoadedVersion] | None:
        """A warmed session per version ``state`` needs, reusing the current plan's; None
        when a version that takes traffic (or the shadow) cannot be loaded."""
        needed = set(state.routed()) | ({state.shadow} if state.shadow else set())
        reusable = current.versions if current is not None else {}
        versions: dict[str, LoadedVersion] = {}
        for version in state.versions():
            old = reusable.get(version)
            if old is not None and old.intra_op_threads == settings.intra_op_threads:
                versions[version] = old
                continue
            loaded = self._open(spec, version, settings.intra_op_threads)
            if loaded is not None:
                versions[version] = loaded
            elif version in needed:
                log.error(
                    "fleet: %s keeps revision %s: version %s could not be loaded",
                    spec.name,
                    current.state.revision if current is not None else "none",
                    version,
                )
                return None
        return versions

    def _open(self, spec: ModelSpec, version: str, threads: int) -> LoadedVersion | None:
        if version not in spec.versions:
            log.error("fleet: %s has no version %s on this worker", spec.name, version)
            return None
        try:
            session = self.registry.open_session(spec.name, version, intra_op_threads=threads)
            warm_up(session, spec)
        except Exception as exc:
            log.error("fleet: loading %s/%s failed: %s", spec.name, version, exc)
            return None
        log.info("fleet: loaded and warmed %s/%s", spec.name, version)
        return LoadedVersion(spec.name, version, threads, session)

    def _publish(self, plan: ModelPlan, current: ModelPlan | None) -> None:
        """Switch to ``plan`` (batches started from now on use it) and retire what it
        dropped: released now if no batch holds it, else when the last one finishes."""
        kept = {id(v) for v in plan.versions.values()}
        with self._lock:
            self._plans = {**self._plans, plan.spec.name: plan}
            for old in current.versions.values() if current is not None else ():
                if id(old) not in kept:
                    old.retired = True
                    old.release_if_unused()
        routing = " ".join(f"{v}={w}" for v, w in plan.state.routed().items())
        log.info(
            "fleet: %s now serves rev %d: loaded %s, route %s%s",
            plan.spec.name,
            plan.state.revision,
            sorted(plan.versions),
            routing,
            f", shadow {plan.shadow}" if plan.shadow else "",
        )

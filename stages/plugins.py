"""Pre/post-processing plugins ("processors"): code a model needs around ``session.run``.

A processor is a class with ``load(config)`` and one or more hooks, all **batch-level** (the
rows of one model's micro-batch at once, so batching survives the plugin):

- ``parse(batch) -> Processed`` -- run by **validate**, before the input checks: turns what a
  request carries (``inputs`` under any names, ``attributes``) into the model's input
  tensors, e.g. 30 features given by name into one ``[30]`` vector. ``batch.arrays`` is
  empty; the returned arrays are the model's inputs, which validate then checks as usual.
- ``preprocess(batch) -> Processed`` -- run by **infer**, before ``session.run``: the
  returned arrays are the feeds.
- ``postprocess(batch, outputs) -> Processed`` -- run by **infer**, after it: the returned
  arrays replace the outputs; ``labels`` (optional) names each row's label.

A hook returns arrays with one row per batch row plus ``errors``: ``{row: why}`` for the
rows it cannot serve. Those rows are dead-lettered (``parse_error``, ``preprocess_error``,
``postprocess_error``) and dropped before the next hook; the other rows go on. A hook that
*raises* is called again on each row alone, so only the rows that raise are dead-lettered:
a plugin never fails its batch. Subclassing :class:`Processor` is the easy way; any class
with ``load`` and at least one hook works.

Where they come from: the model's ``model.yaml`` (:mod:`schemas.processors`) names each one
by ``use``: an entry point name in the group :data:`ENTRY_POINT_GROUP` (a package declares
``[project.entry-points."streaminfer.processors"] name = "module:Class"``) or a dotted path
``module:Class`` / ``module.Class`` importable by the worker. Each hook's seconds go into
every served row's result ``timings`` as ``<processor>.<hook>_s`` and into the
``streaminfer_processor_seconds`` histogram.
"""

from __future__ import annotations

import dataclasses
import importlib
import logging
import time
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from typing import Any, Final, Literal

import msgspec
import numpy as np
import numpy.typing as npt

from schemas.messages import RequestV1, Tensor, ValidatedRequestV1
from schemas.models import ModelSpec
from schemas.processors import ProcessorSpec
from schemas.tensors import tensor_from_array
from schemas.validation import Validated
from stages.errors import Reason
from stages.metrics import NullMetrics, StageMetrics
from stages.records import Record, Rejection

log = logging.getLogger(__name__)

ENTRY_POINT_GROUP: Final = "streaminfer.processors"
Arrays = dict[str, npt.NDArray[Any]]
Hook = Literal["parse", "preprocess", "postprocess"]
HOOKS: Final[tuple[Hook, ...]] = ("parse", "preprocess", "postprocess")
StageName = Literal["validate", "infer"]
STAGE_HOOKS: Final[dict[StageName, tuple[Hook, ...]]] = {
    "validate": ("parse",),
    "infer": ("preprocess", "postprocess"),
}
REASONS: Final[dict[Hook, Reason]] = {
    "parse": "parse_error",
    "preprocess": "preprocess_error",
    "postprocess": "postprocess_error",
}
AnyRequest = RequestV1 | ValidatedRequestV1


@dataclass(frozen=True, slots=True)
class Batch:
    """The rows a hook sees: row ``i`` of every array belongs to ``requests[i]``."""

    requests: Sequence[AnyRequest]
    arrays: Mapping[str, npt.NDArray[Any]] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.requests)


@dataclass(slots=True)
class Processed:
    """A hook's answer: ``arrays`` with one row per batch row (what an errored row holds
    does not matter), optional per-row ``labels``, and ``errors`` (row -> why) for the rows
    that must be dead-lettered instead of served."""

    arrays: Arrays
    labels: Sequence[str | None] | None = None
    errors: Mapping[int, str] = field(default_factory=dict)


class Processor:
    """Base class of a processor: override :meth:`load` and the hooks it needs (the stage
    calls only the overridden ones; see the module docstring for what each returns)."""

    def load(self, config: Mapping[str, Any]) -> None:
        """Called once, with the ``config`` of its ``model.yaml`` entry, before any hook."""

    def parse(self, batch: Batch) -> Processed:
        raise NotImplementedError

    def preprocess(self, batch: Batch) -> Processed:
        raise NotImplementedError

    def postprocess(self, batch: Batch, outputs: Arrays) -> Processed:
        raise NotImplementedError


class ProcessorLoadError(Exception):
    """A processor named in a ``model.yaml`` cannot be found, built or loaded."""


def resolve(use: str) -> type[Any]:
    """The class ``use`` names: an entry point of :data:`ENTRY_POINT_GROUP`, else a dotted
    path (``module:Class`` or ``module.Class``)."""
    found = entry_points(group=ENTRY_POINT_GROUP).select(name=use)
    if found:
        loaded = next(iter(found)).load()
    else:
        module, sep, attr = use.partition(":") if ":" in use else use.rpartition(".")
        if not sep or not module or not attr:
            raise ProcessorLoadError(
                f"{use!r} is neither an entry point of {ENTRY_POINT_GROUP!r} "
                "nor a dotted path module:Class"
            )
        try:
            loaded = getattr(importlib.import_module(module), attr)
        except (ImportError, AttributeError) as exc:
            raise ProcessorLoadError(f"cannot import {use!r}: {exc}") from exc
    if not isinstance(loaded, type):
        raise ProcessorLoadError(f"{use!r} is {loaded!r}, not a class")
    return loaded


def hooks_of(processor: object) -> tuple[Hook, ...]:
    """The hooks ``processor`` implements (a :class:`Processor` subclass: those it overrides)."""
    cls = type(processor)
    return tuple(
        hook
        for hook in HOOKS
        if callable(getattr(cls, hook, None)) and getattr(cls, hook) is not getattr(Processor, hook)
    )


def load_processor(spec: ProcessorSpec, stage: StageName) -> Any:
    """An instance of ``spec.use``, loaded with ``spec.config``; it must implement a hook of
    ``stage``."""
    cls = resolve(spec.use)
    try:
        processor = cls()
        processor.load(spec.config)
    except Exception as exc:
        raise ProcessorLoadError(
            f"{spec.use!r} failed to load: {type(exc).__name__}: {exc}"
        ) from exc
    if not set(hooks_of(processor)) & set(STAGE_HOOKS[stage]):
        wanted = " or ".join(STAGE_HOOKS[stage])
        raise ProcessorLoadError(f"{spec.use!r} implements no {wanted} hook for {stage}")
    return processor


def check_processors(spec: ModelSpec) -> list[str]:
    """Why ``spec``'s processors cannot run, one line each (empty: every one loads). For
    ``streaminfer models validate`` and the like: find out before a worker does."""
    problems = []
    stages: tuple[tuple[StageName, tuple[ProcessorSpec, ...]], ...] = (
        ("validate", spec.processors.validate),
        ("infer", spec.processors.infer),
    )
    for stage, specs in stages:
        for processor in specs:
            try:
                load_processor(processor, stage)
            except ProcessorLoadError as exc:
                problems.append(f"processors.{stage} {processor.name!r}: {exc}")
    return problems


@dataclass(frozen=True, slots=True)
class Applied:
    """What a stage's processors made of a group of rows.

    ``rows``: the index (in the group) of every row still served, in order; ``arrays``,
    ``labels``: those rows only; ``rejected``: group index -> (DLQ reason, detail);
    ``timings``: ``<processor>.<hook>_s`` -> seconds that hook took for the group.
    """

    rows: Sequence[int]
    arrays: Arrays
    labels: Sequence[str | None] | None = None
    rejected: Mapping[int, tuple[str, str]] = field(default_factory=dict)
    timings: Mapping[str, float] = field(default_factory=dict)

    @classmethod
    def everything(cls, arrays: Arrays, count: int) -> Applied:
        """No processors: every row served as it is."""
        return cls(rows=range(count), arrays=arrays)

    def label(self, row: int, default: str | None) -> str | None:
        """Row ``row``'s label (a postprocess hook's, else ``default``)."""
        chosen = self.labels[row] if self.labels is not None else None
        return default if chosen is None else chosen


ModelRun = Callable[[Arrays], Arrays]


class ProcessorChain:
    """The loaded processors of one model in one stage, in ``model.yaml`` order."""

    def __init__(
        self,
        model: str,
        processors: Sequence[tuple[str, Any]],
        *,
        metrics: StageMetrics | None = None,
    ) -> None:
        self._model = model
        self._processors = [(name, p, hooks_of(p)) for name, p in processors]
        self._metrics: StageMetrics = metrics or NullMetrics()

    def parse(self, requests: Sequence[AnyRequest]) -> Applied:
        """Validate's step: the model's input arrays built from ``requests``."""
        return self._apply("parse", Batch(requests), {})

    def around(self, batch: Batch, run: ModelRun) -> Applied:
        """Infer's step: preprocess ``batch.arrays``, ``run`` the model on the rows left,
        postprocess its outputs. ``run`` raising propagates (the stage isolates it)."""
        pre = self._apply("preprocess", batch, dict(batch.arrays))
        if not pre.rows:
            return pre
        served = Batch([batch.requests[i] for i in pre.rows], pre.arrays)
        post = self._apply("postprocess", served, run(pre.arrays))
        return Applied(
            rows=[pre.rows[i] for i in post.rows],
            arrays=post.arrays,
            labels=post.labels,
            rejected={**pre.rejected, **{pre.rows[i]: why for i, why in post.rejected.items()}},
            timings={**pre.timings, **post.timings},
        )

    def _apply(self, hook: Hook, batch: Batch, arrays: Arrays) -> Applied:
        """Every processor's ``hook`` in turn on the rows still served. For ``parse`` and
        ``preprocess`` the arrays are the batch's own; for ``postprocess`` the outputs."""
        rows: list[int] = list(range(len(batch)))
        labels: list[str | None] | None = None
        rejected: dict[int, tuple[str, str]] = {}
        timings: dict[str, float] = {}
        for name, processor, hooks in self._processors:
            if hook not in hooks or not rows:
                continue
            requests = [batch.requests[i] for i in rows]
            inputs = arrays if hook != "postprocess" else _take(batch.arrays, rows, len(batch))
            started = time.perf_counter()
            done = _call(processor, hook, Batch(requests, inputs), arrays)
            seconds = time.perf_counter() - started
            timings[f"{name}.{hook}_s"] = seconds
            self._metrics.processor_run(
                model=self._model, processor=name, hook=hook, rows=len(rows), seconds=seconds
            )
            for i, why in done.errors.items():
                rejected[rows[i]] = (REASONS[hook], f"processor {name!r} ({hook}): {why}")
            keep = [i for i in range(len(rows)) if i not in done.errors]
            arrays = _take(done.arrays, keep, len(rows))
            if done.labels is not None:
                labels = [done.labels[i] for i in keep]
            elif labels is not None:
                labels = [labels[i] for i in keep]
            rows = [rows[i] for i in keep]
        return Applied(rows=rows, arrays=arrays, labels=labels, rejected=rejected, timings=timings)


def _call(processor: Any, hook: Hook, batch: Batch, arrays: Arrays) -> Processed:
    """``processor.<hook>`` on the batch; when it raises, on each row alone (the rows that
    raise become errors). An answer of the wrong shape fails every row: a plugin bug."""
    try:
        return _checked(_invoke(processor, hook, batch, arrays), len(batch))
    except Exception as exc:
        if len(batch) == 1:
            return Processed(arrays={}, errors={0: f"{type(exc).__name__}: {exc}"})
        log.warning("processor %s of %d rows raised (%s); isolating rows", hook, len(batch), exc)
    singles = [
        _call(processor, hook, _row(batch, i), _take(arrays, [i], len(batch)))
        for i in range(len(batch))
    ]
    return _joined(singles)


def _invoke(processor: Any, hook: Hook, batch: Batch, arrays: Arrays) -> Processed:
    if hook == "parse":
        result = processor.parse(batch)
    elif hook == "preprocess":
        result = processor.preprocess(Batch(batch.requests, arrays))
    else:
        result = processor.postprocess(batch, arrays)
    if not isinstance(result, Processed):
        raise TypeError(f"{hook} returned {type(result).__name__}, not Processed")
    return result


def _checked(done: Processed, count: int) -> Processed:
    """``done`` when it has a row per batch row; else every row fails, saying why."""
    wrong = [f"{k} has {len(v)} rows" for k, v in done.arrays.items() if len(v) != count]
    if done.labels is not None and len(done.labels) != count:
        wrong.append(f"labels has {len(done.labels)} rows")
    bad_rows = [i for i in done.errors if not 0 <= i < count]
    if bad_rows:
        wrong.append(f"errors name rows {bad_rows}")
    if not wrong:
        return done
    why = f"answered a batch of {count} rows wrongly: {'; '.join(wrong)}"
    return Processed(arrays={}, errors=dict.fromkeys(range(count), why))


def _row(batch: Batch, i: int) -> Batch:
    return Batch([batch.requests[i]], _take(dict(batch.arrays), [i], len(batch)))


def _joined(singles: list[Processed]) -> Processed:
    """One answer from one answer per row; a failed row borrows a served row's values as a
    placeholder (its row is dropped anyway)."""
    served = [s for s in singles if 0 not in s.errors]
    if not served:
        return Processed(arrays={}, errors={i: s.errors[0] for i, s in enumerate(singles)})
    filler = served[0]
    parts = [s if 0 not in s.errors else filler for s in singles]
    arrays = {k: np.concatenate([p.arrays[k] for p in parts]) for k in filler.arrays}
    labels = None
    if any(s.labels is not None for s in served):
        labels = [p.labels[0] if p.labels is not None else None for p in parts]
    errors = {i: s.errors[0] for i, s in enumerate(singles) if 0 in s.errors}
    return Processed(arrays=arrays, labels=labels, errors=errors)


def _take(arrays: Mapping[str, npt.NDArray[Any]], rows: list[int], count: int) -> Arrays:
    """``arrays`` restricted to ``rows`` (no copy when that is every row)."""
    if len(rows) == count:
        return dict(arrays)
    return {k: v[rows] for k, v in arrays.items()}


class StageProcessors:
    """The processors of every model for one stage, loaded on first use and kept while the
    model's ``processors`` section stays the same (a changed ``model.yaml`` reloads them).

    A processor that cannot be loaded fails only its model's rows (``stage_error``, counted
    by the DLQ budget): the worker keeps serving the other models.
    """

    def __init__(
        self,
        stage: StageName,
        *,
        metrics: StageMetrics | None = None,
        load: Callable[[ProcessorSpec, StageName], Any] = load_processor,
    ) -> None:
        self._stage = stage
        self._metrics = metrics
        self._load = load
        self._chains: dict[str, tuple[tuple[ProcessorSpec, ...], ProcessorChain | str]] = {}

    def specs(self, spec: ModelSpec) -> tuple[ProcessorSpec, ...]:
        return spec.processors.validate if self._stage == "validate" else spec.processors.infer

    def chain(self, spec: ModelSpec) -> ProcessorChain | str | None:
        """The model's chain; None when it has no processors here; a string saying why
        they cannot be loaded."""
        specs = self.specs(spec)
        if not specs:
            return None
        cached = self._chains.get(spec.name)
        if cached is None or cached[0] != specs:
            cached = (specs, self._build(spec.name, specs))
            self._chains[spec.name] = cached
        return cached[1]

    def _build(self, model: str, specs: tuple[ProcessorSpec, ...]) -> ProcessorChain | str:
        try:
            loaded = [(s.name, self._load(s, self._stage)) for s in specs]
        except ProcessorLoadError as exc:
            log.error("%s: processors of model %r cannot be loaded: %s", self._stage, model, exc)
            return f"processors of model {model!r} cannot be loaded: {exc}"
        return ProcessorChain(model, loaded, metrics=self._metrics)

    def parse(self, spec: ModelSpec, requests: Sequence[AnyRequest]) -> Applied | None:
        """Validate's step for one model's requests; None when it has no parse processors."""
        chain = self.chain(spec)
        if chain is None:
            return None
        if isinstance(chain, str):
            return _unloadable(chain, len(requests))
        return chain.parse(requests)

    def parse_all(
        self, parsed: Sequence[tuple[Record, Validated]]
    ) -> tuple[list[tuple[Record, Validated]], list[Rejection]]:
        """Validate's step for a batch, in its order: each request of a model with parse
        processors gets the inputs they build (and their timings); the rows they refuse
        become rejections. Requests of other models pass untouched."""
        groups: dict[str, list[int]] = defaultdict(list)
        for index, (_, validated) in enumerate(parsed):
            if self.specs(validated.spec):
                groups[validated.spec.name].append(index)
        kept: list[tuple[Record, Validated] | None] = list(parsed)
        rejected: list[Rejection] = []
        for indexes in groups.values():
            spec = parsed[indexes[0]][1].spec
            applied = self.parse(spec, [parsed[i][1].request for i in indexes])
            assert applied is not None  # the group holds only models with parse processors
            for row, (reason, detail) in applied.rejected.items():
                rejected.append(Rejection(parsed[indexes[row]][0], reason, detail))
                kept[indexes[row]] = None
            for row, inputs in zip(
                applied.rows, _row_tensors(applied.arrays, len(applied.rows)), strict=True
            ):
                record, validated = parsed[indexes[row]]
                request = msgspec.structs.replace(validated.request, inputs=inputs)
                timings = dict(applied.timings)
                kept[indexes[row]] = (
                    record,
                    dataclasses.replace(validated, request=request, timings=timings),
                )
        return [item for item in kept if item is not None], rejected

    def around(self, spec: ModelSpec, batch: Batch, run: ModelRun) -> Applied:
        """Infer's step: the model's processors around ``run`` (just ``run`` without any)."""
        chain = self.chain(spec)
        if chain is None:
            return Applied.everything(run(dict(batch.arrays)), len(batch))
        if isinstance(chain, str):
            return _unloadable(chain, len(batch))
        return chain.around(batch, run)


def _row_tensors(arrays: Arrays, count: int) -> list[dict[str, Tensor]]:
    """One ``{input: Tensor}`` per row of ``arrays`` (``count`` rows)."""
    return [{name: tensor_from_array(a[row]) for name, a in arrays.items()} for row in range(count)]


def _unloadable(why: str, count: int) -> Applied:
    return Applied(rows=[], arrays={}, rejected=dict.fromkeys(range(count), ("stage_error", why)))

"""infer: run the model, one ``session.run`` per (model, version) per consumed batch.

Input: ``inference.validated`` (``ValidatedRequestV1``). Output: ``inference.results``
(``ResultV1``), and ``inference.shadow`` for a model with a shadow version. When the model
declares labels, each result carries the predicted label and the score of every label.

Each batch is served under one :class:`~stages.fleet.Lease` of the model fleet: the plans in
force when the batch started, whatever the control plane changes meanwhile (a switch falls
between two batches). A request that names a version gets that version if it is loaded,
else ``unknown_model``; one that names none is routed by its record key
(:meth:`~stages.fleet.ModelPlan.route`). Every result carries the version that produced it.

Nothing upstream is trusted: each record is checked on its own against its model's
signature before it joins a batch (dtype, shape, buffer size, values; finite times), so a
hostile record on ``inference.validated`` is dead-lettered for what it is, whatever else is
in its batch. Rejected: ``malformed``, ``unknown_model``, ``signature_mismatch``,
``non_finite``, ``out_of_range``, ``expired``, and ``inference_error`` (the runtime raised
for this record even when run alone).
"""

from __future__ import annotations

import logging
import math
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from typing import Any

import msgspec
import numpy as np
import numpy.typing as npt

from schemas import Codec, DecodeError, ResultV1, Tensor, ValidatedRequestV1, tensor_from_array
from schemas.messages import SCHEMA_NAMES, DType
from schemas.models import ModelSpec, TensorSpec
from schemas.tensors import tensor_to_array
from schemas.validation import Invalid, check_inputs, numerically_clean
from stages.fleet import Lease, ModelFleet, ModelPlan
from stages.metrics import NullMetrics, StageMetrics
from stages.models import ModelRegistry
from stages.plugins import Applied, Batch, StageProcessors
from stages.records import BatchOutcome, Output, Record, Rejection, output_headers

log = logging.getLogger(__name__)
_SCHEMA = SCHEMA_NAMES[ResultV1]
Arrays = dict[str, npt.NDArray[Any]]


class Member(msgspec.Struct, frozen=True, gc=False):
    """One request in a model-version run: a primary (its result goes to
    ``inference.results``) or a shadow twin (to ``inference.shadow``). A Struct, not a frozen
    dataclass: one per record, and a Struct is built several times faster."""

    record: Record
    request: ValidatedRequestV1
    shadow: bool = False


class InferStage:
    """Checks and routes each record, groups the batch by (model, version), stacks the
    inputs, runs once per group, splits the outputs."""

    name = "infer"

    def __init__(
        self,
        *,
        output_topic: str,
        fleet: ModelFleet | None = None,
        registry: ModelRegistry | None = None,
        shadow_topic: str | None = None,
        metrics: StageMetrics | None = None,
        clock: Callable[[], float] = time.time,
        processors: StageProcessors | None = None,
    ) -> None:
        if fleet is None:
            if registry is None:
                raise TypeError("InferStage needs a fleet or a registry")
            fleet = ModelFleet(registry=registry)  # the repository's policy, no control plane
        self._fleet = fleet
        self._output_topic = output_topic
        self._shadow_topic = shadow_topic
        self._metrics: StageMetrics = metrics or NullMetrics()
        # Pre/post-processing plugins of each model (stages.plugins), loaded on first use.
        self._processors = processors or StageProcessors("infer", metrics=self._metrics)
        self._clock = clock
        self._consumed_at = time.perf_counter()  # when the batch in hand reached the stage
        self._requests = Codec(ValidatedRequestV1)
        self._results = Codec(ResultV1)

    def process(self, batch: Sequence[Record]) -> BatchOutcome:
        self._consumed_at = time.perf_counter()
        outcome = BatchOutcome.empty()
        with self._fleet.lease() as lease:
            groups = self._group(batch, lease, outcome)
            for (model, version), members in groups.items():
                plan = lease.plans[model]
                step = plan.settings.max_batch_size
                for start in range(0, len(members), step):
                    outcome.extend(self._run_group(plan, version, members[start : start + step]))
        return outcome

    def _group(
        self, batch: Sequence[Record], lease: Lease, outcome: BatchOutcome
    ) -> dict[tuple[str, str], list[Member]]:
        """Each servable record under its (model, version); the others into ``outcome``.
        A model's shadow version gets a twin of every record served by another version."""
        now = self._clock()
        admitted: list[tuple[Record, ValidatedRequestV1, ModelPlan]] = []
        for record in batch:
            checked = self._admit(record, lease, now)
            if isinstance(checked, Rejection):
                outcome.rejected.append(checked)
            else:
                admitted.append((record, *checked))
        groups: dict[tuple[str, str], list[Member]] = defaultdict(list)
        for (record, request, plan), problem in zip(
            admitted, _input_problems(admitted), strict=True
        ):
            if problem is not None:
                outcome.rejected.append(Rejection(record, problem.reason, problem.detail))
                continue
            version = self._version(record, request, plan)
            if isinstance(version, Rejection):
                outcome.rejected.append(version)
                continue
            groups[(plan.spec.name, version)].append(Member(record, request))
            if plan.shadow is not None and plan.shadow != version and self._shadow_topic:
                groups[(plan.spec.name, plan.shadow)].append(Member(record, request, shadow=True))
        return groups

    def _admit(
        self, record: Record, lease: Lease, now: float
    ) -> tuple[ValidatedRequestV1, ModelPlan] | Rejection:
        try:
            request = self._requests.decode(record.value)
        except (DecodeError, RecursionError) as exc:
            detail = f"not a valid inference.validated/1: {exc}"
            return Rejection(record, "malformed", detail)
        problem = _times_problem(request)
        if problem is not None:
            return Rejection(record, "malformed", problem)
        if request.deadline is not None and request.deadline < now:
            late = now - request.deadline
            return Rejection(record, "expired", f"deadline passed {late:.3f}s before inference")
        plan = lease.plan(request.model)
        if plan is None:
            known = ", ".join(sorted(lease.plans)) or "none"
            detail = f"model {request.model!r} is not served (served: {known})"
            return Rejection(record, "unknown_model", detail)
        return request, plan

    def _version(
        self, record: Record, request: ValidatedRequestV1, plan: ModelPlan
    ) -> str | Rejection:
        """The version named by the request if it is loaded; else the routing's choice."""
        if request.model_version is None:
            if len(plan.routes) == 1:  # one version takes everything: no key to hash
                return plan.routes[0][1]
            return plan.route(record.key or request.id.encode())
        if request.model_version in plan.versions:
            return request.model_version
        loaded = ", ".join(plan.versions)
        detail = (
            f"version {request.model_version!r} of model {request.model!r} is not loaded "
            f"(loaded: {loaded})"
        )
        return Rejection(record, "unknown_model", detail)

    def _run_group(self, plan: ModelPlan, version: str, members: list[Member]) -> BatchOutcome:
        try:
            served = self._run(plan, version, [m.request for m in members])
        except Exception as exc:
            if len(members) == 1:
                return _failed(members[0], exc)
            # One poison request fails the whole run: run each alone to find it.
            log.warning(
                "infer: batch run of %s/%s failed (%s); isolating", plan.spec.name, version, exc
            )
            isolated = BatchOutcome.empty()
            for member in members:
                isolated.extend(self._run_group(plan, version, [member]))
            return isolated
        inferred_at = self._clock()
        rows = _RowOutputs(plan.spec, served.arrays)
        results = _refused_by_processors(members, served)
        for row, index in enumerate(served.rows):  # the rows the processors did not refuse
            member = members[index]
            result = self._result(member.request, version, rows, row, inferred_at, served)
            results.outputs.append(
                Output(
                    topic=self._shadow_topic
                    if member.shadow and self._shadow_topic
                    else self._output_topic,
                    key=member.record.key,
                    value=self._results.encode(result),
                    headers=output_headers(member.record, _SCHEMA),
                )
            )
        return results

    def _run(self, plan: ModelPlan, version: str, requests: list[ValidatedRequestV1]) -> Applied:
        """The model's processors around its session (just the session without any)."""
        feeds = {i.name: _stacked(requests, i) for i in plan.spec.inputs}
        return self._processors.around(
            plan.spec, Batch(requests, feeds), lambda ready: self._session_run(plan, version, ready)
        )

    def _session_run(self, plan: ModelPlan, version: str, feeds: Arrays) -> Arrays:
        spec = plan.spec
        session = plan.session(version)
        rows = len(next(iter(feeds.values())))
        padded = plan.settings.padded_size(rows)
        feeds = {name: _padded(value, padded) for name, value in feeds.items()}
        names = [o.name for o in spec.outputs]
        started = time.perf_counter()
        outputs = session.run(names, feeds)
        self._metrics.model_run(
            model=spec.name,
            version=version,
            requests=rows,
            queue_s=started - self._consumed_at,
            compute_s=time.perf_counter() - started,
        )
        return {name: value[:rows] for name, value in zip(names, outputs, strict=True)}

    def _result(
        self,
        request: ValidatedRequestV1,
        version: str,
        rows: _RowOutputs,
        row: int,
        inferred_at: float,
        served: Applied,
    ) -> ResultV1:
        label, scores = rows.label_and_scores(row)
        return ResultV1(
            id=request.id,
            model=request.model,
            model_version=version,
            status="ok",
            outputs=rows.tensors(row),
            created_at=request.created_at,
            label=served.label(row, label),  # a postprocess processor may name it
            scores=scores,
            timings={
                "validated": request.validated_at,
                "inferred": inferred_at,
                **request.timings,  # the parse processors' seconds
                **served.timings,  # "<processor>.<hook>_s"
            },
            attributes=request.attributes,
        )


def _input_problems(
    admitted: Sequence[tuple[Record, ValidatedRequestV1, ModelPlan]],
) -> list[Invalid | None]:
    """Per record, why its inputs do not fit its model (None: they do). The batch check
    vouches for most rows at once; a row it refuses gets the exact check, which names the
    reason -- the same verdict whatever else is in the batch."""
    clean = numerically_clean([(plan.spec, request.inputs) for _, request, plan in admitted])
    return [
        None if ok else check_inputs(plan.spec, request.inputs)
        for (_, request, plan), ok in zip(admitted, clean, strict=True)
    ]


def _times_problem(request: ValidatedRequestV1) -> str | None:
    """Why the request's times are unusable (not finite numbers poison every latency
    computed from them), or None."""
    deadline = request.deadline
    if (
        math.isfinite(request.created_at)
        and math.isfinite(request.validated_at)
        and (deadline is None or math.isfinite(deadline))
    ):
        return None  # the usual case, without building the loop below
    for name, value in (("created_at", request.created_at), ("deadline", deadline)):
        if value is not None and not math.isfinite(value):
            return f"{name} must be finite, got {value!r}"
    if not math.isfinite(request.validated_at):
        return f"validated_at must be finite, got {request.validated_at!r}"
    return None


def _stacked(requests: list[ValidatedRequestV1], spec: TensorSpec) -> npt.NDArray[Any]:
    """The batch of input ``spec.name``: the requests' buffers joined and read as one array
    (one numpy call per batch, not three per request). Every request's tensor was checked
    against ``spec`` when it was admitted (:func:`_input_problems`); should the joined size
    still not fit, each is read on its own, which raises for the one that does not."""
    tensors = [r.inputs[spec.name] for r in requests]
    dtype = np.dtype(spec.dtype).newbyteorder("<")
    joined = bytearray().join([t.data for t in tensors])  # a bytearray: the array is writable
    if len(joined) != len(tensors) * math.prod(spec.shape) * dtype.itemsize:
        return np.stack([tensor_to_array(t) for t in tensors])
    return np.frombuffer(joined, dtype=dtype).reshape((len(tensors), *spec.shape))


def _padded(stacked: npt.NDArray[Any], padded: int) -> npt.NDArray[Any]:
    extra = padded - len(stacked)
    if extra <= 0:
        return stacked
    return np.concatenate([stacked, np.repeat(stacked[-1:], extra, axis=0)])


def _refused_by_processors(members: list[Member], served: Applied) -> BatchOutcome:
    """The members a processor refused, dead-lettered with its reason; a shadow twin's
    refusal is only logged (a shadow never changes what the primary serves)."""
    refused = BatchOutcome.empty()
    for index, (reason, detail) in served.rejected.items():
        member = members[index]
        if member.shadow:
            log.warning("infer: shadow processor refused %s: %s", member.request.id, detail)
        else:
            refused.rejected.append(Rejection(member.record, reason, detail))
    return refused


def _failed(member: Member, exc: Exception) -> BatchOutcome:
    """A request the model cannot run alone: dead-lettered; its shadow twin only logged
    (a shadow never changes what the primary serves)."""
    if member.shadow:
        log.warning("infer: shadow run failed for %s: %s", member.request.id, exc)
        return BatchOutcome.empty()
    detail = f"{type(exc).__name__}: {exc}"
    return BatchOutcome(outputs=[], rejected=[Rejection(member.record, "inference_error", detail)])


class _RowOutputs:
    """A batch's outputs, converted once per batch (not once per row): each output's
    little-endian C-order buffer is sliced per row, labels come from one ``argmax`` and
    scores from one ``tolist``. Per-row numpy calls cost more than the model on small rows."""

    def __init__(self, spec: ModelSpec, outputs: Arrays) -> None:
        self._buffers: list[tuple[str, DType, list[int], bytes, int]] = []
        for name, value in outputs.items():
            whole = tensor_from_array(value)  # one copy of the batch, sliced per row below
            row_size = len(whole.data) // max(whole.shape[0], 1)
            self._buffers.append((name, whole.dtype, whole.shape[1:], whole.data, row_size))
        self._labels = spec.labels if spec.labels and spec.label_from else ()
        if self._labels and spec.label_from is not None:
            scores = outputs[spec.label_from]
            self._argmax: list[int] = np.argmax(scores, axis=1).tolist()
            self._scores: list[list[float]] = scores.tolist()

    def tensors(self, row: int) -> dict[str, Tensor]:
        return {
            name: Tensor(dtype=dtype, shape=shape, data=data[row * size : (row + 1) * size])
            for name, dtype, shape, data, size in self._buffers
        }

    def label_and_scores(self, row: int) -> tuple[str | None, dict[str, float] | None]:
        if not self._labels:
            return None, None
        return self._labels[self._argmax[row]], dict(
            zip(self._labels, self._scores[row], strict=True)
        )

"""infer: run the model, one ``session.run`` per (model, version) per consumed batch.

Input: ``inference.validated`` (``ValidatedRequestV1``). Output: ``inference.results``
(``ResultV1``). When the model declares labels, each result carries the predicted label and
the score of every label. Rejected: ``malformed`` (not a validated request) and
``inference_error`` (the runtime raised for this record even when run alone).
"""

from __future__ import annotations

import logging
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

from schemas import Codec, DecodeError, ResultV1, Tensor, ValidatedRequestV1, tensor_from_array
from schemas.messages import SCHEMA_NAMES, DType
from schemas.models import ModelSpec
from schemas.tensors import tensor_to_array
from stages.metrics import NullMetrics, StageMetrics
from stages.models import ModelRegistry
from stages.records import BatchOutcome, Output, Record, Rejection, output_headers

log = logging.getLogger(__name__)
_SCHEMA = SCHEMA_NAMES[ResultV1]
Arrays = dict[str, npt.NDArray[Any]]


class InferStage:
    """Groups a batch by model version, stacks the inputs, runs once, splits the outputs."""

    name = "infer"

    def __init__(
        self,
        *,
        registry: ModelRegistry,
        output_topic: str,
        metrics: StageMetrics | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._registry = registry
        self._output_topic = output_topic
        self._metrics: StageMetrics = metrics or NullMetrics()
        self._clock = clock
        self._consumed_at = time.perf_counter()  # when the batch in hand reached the stage
        self._requests = Codec(ValidatedRequestV1)
        self._results = Codec(ResultV1)

    def process(self, batch: Sequence[Record]) -> BatchOutcome:
        outcome = BatchOutcome.empty()
        self._consumed_at = time.perf_counter()
        now = self._clock()
        groups: dict[tuple[str, str], list[tuple[Record, ValidatedRequestV1]]] = defaultdict(list)
        for record in batch:
            try:
                request = self._requests.decode(record.value)
            except DecodeError as exc:
                detail = f"not a valid inference.validated/1: {exc}"
                outcome.rejected.append(Rejection(record, "malformed", detail))
                continue
            if request.deadline is not None and request.deadline < now:
                late = now - request.deadline
                detail = f"deadline passed {late:.3f}s before inference"
                outcome.rejected.append(Rejection(record, "expired", detail))
                continue
            groups[(request.model, request.model_version)].append((record, request))
        for (model, version), members in groups.items():
            step = self._registry.spec(model).max_batch_size
            for start in range(0, len(members), step):
                outcome.extend(self._run_group(model, version, members[start : start + step]))
        return outcome

    def _run_group(
        self, model: str, version: str, members: list[tuple[Record, ValidatedRequestV1]]
    ) -> BatchOutcome:
        spec = self._registry.spec(model)
        try:
            outputs = self._run(spec, version, [request for _, request in members])
        except Exception as exc:
            if len(members) == 1:
                record = members[0][0]
                detail = f"{type(exc).__name__}: {exc}"
                return BatchOutcome(
                    outputs=[], rejected=[Rejection(record, "inference_error", detail)]
                )
            # One poison request fails the whole run: run each alone to find it.
            log.warning("infer: batch run of %s/%s failed (%s); isolating", model, version, exc)
            isolated = BatchOutcome.empty()
            for member in members:
                isolated.extend(self._run_group(model, version, [member]))
            return isolated
        inferred_at = self._clock()
        rows = _RowOutputs(spec, outputs)
        results = BatchOutcome.empty()
        for row, (record, request) in enumerate(members):
            result = self._result(request, rows, row, inferred_at)
            results.outputs.append(
                Output(
                    topic=self._output_topic,
                    key=record.key,
                    value=self._results.encode(result),
                    headers=output_headers(record, _SCHEMA),
                )
            )
        return results

    def _run(self, spec: ModelSpec, version: str, requests: list[ValidatedRequestV1]) -> Arrays:
        session = self._registry.session(spec.name, version)
        feeds = {
            i.name: np.stack([tensor_to_array(r.inputs[i.name]) for r in requests])
            for i in spec.inputs
        }
        names = [o.name for o in spec.outputs]
        started = time.perf_counter()
        outputs = session.run(names, feeds)
        self._metrics.model_run(
            model=spec.name,
            version=version,
            requests=len(requests),
            queue_s=started - self._consumed_at,
            compute_s=time.perf_counter() - started,
        )
        return dict(zip(names, outputs, strict=True))

    def _result(
        self, request: ValidatedRequestV1, rows: _RowOutputs, row: int, inferred_at: float
    ) -> ResultV1:
        label, scores = rows.label_and_scores(row)
        return ResultV1(
            id=request.id,
            model=request.model,
            model_version=request.model_version,
            status="ok",
            outputs=rows.tensors(row),
            created_at=request.created_at,
            label=label,
            scores=scores,
            timings={"validated": request.validated_at, "inferred": inferred_at},
            attributes=request.attributes,
        )


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

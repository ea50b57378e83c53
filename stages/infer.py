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

from schemas import Codec, DecodeError, ResultV1, ValidatedRequestV1, tensor_from_array
from schemas.messages import SCHEMA_NAMES
from schemas.tensors import tensor_to_array
from stages.models import ModelRegistry, ModelSpec
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
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._registry = registry
        self._output_topic = output_topic
        self._clock = clock
        self._requests = Codec(ValidatedRequestV1)
        self._results = Codec(ResultV1)

    def process(self, batch: Sequence[Record]) -> BatchOutcome:
        outcome = BatchOutcome.empty()
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
        results = BatchOutcome.empty()
        for row, (record, request) in enumerate(members):
            result = self._result(spec, request, outputs, row, inferred_at)
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
        return dict(zip(names, session.run(names, feeds), strict=True))

    def _result(
        self,
        spec: ModelSpec,
        request: ValidatedRequestV1,
        outputs: Arrays,
        row: int,
        inferred_at: float,
    ) -> ResultV1:
        label: str | None = None
        scores: dict[str, float] | None = None
        if spec.labels and spec.label_from:
            values = outputs[spec.label_from][row]
            label = spec.labels[int(np.argmax(values))]
            scores = dict(zip(spec.labels, values.tolist(), strict=True))
        return ResultV1(
            id=request.id,
            model=request.model,
            model_version=request.model_version,
            status="ok",
            outputs={name: tensor_from_array(value[row]) for name, value in outputs.items()},
            created_at=request.created_at,
            label=label,
            scores=scores,
            timings={"validated": request.validated_at, "inferred": inferred_at},
            attributes=request.attributes,
        )

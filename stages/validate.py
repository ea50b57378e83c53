"""validate: decode requests and check them against the target model's input signature.

Input: ``inference.requests`` (and ``inference.requests.backfill``), ``RequestV1``.
Output: ``inference.validated``, ``ValidatedRequestV1`` (the version the request named, or
none: infer routes those at batch time).
What is checked, and the DLQ reasons, are defined once in :mod:`schemas.validation` (the HTTP
ingest and the backfill CLI use the same definition): ``malformed``, ``unknown_model``,
``signature_mismatch``, ``non_finite``, ``out_of_range``, ``expired``.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Collection, Sequence

from schemas import Codec, ValidatedRequestV1
from schemas.messages import SCHEMA_NAMES
from schemas.models import ModelCatalog, ModelSpec
from schemas.validation import (
    Invalid,
    Validated,
    check_envelope,
    check_inputs,
    decode_request,
    numerically_clean,
)
from stages.plugins import StageProcessors
from stages.records import BatchOutcome, Output, Record, Rejection, output_headers

_SCHEMA = SCHEMA_NAMES[ValidatedRequestV1]


class ValidateStage:
    """Checks each request of a batch; one bad request never affects the others.

    The input tensors of the whole batch are checked at once (:func:`numerically_clean`);
    only the rows it cannot vouch for get the exact per-record check, which names the reason.
    """

    name = "validate"

    def __init__(
        self,
        *,
        catalog: ModelCatalog,
        output_topic: str,
        clock: Callable[[], float] = time.time,
        loaded_versions: Callable[[ModelSpec], Collection[str]] | None = None,
        processors: StageProcessors | None = None,
    ) -> None:
        self._catalog = catalog
        # Parse hooks of models that take named features (stages.plugins), loaded on first use.
        self._processors = processors or StageProcessors("validate")
        # The control plane's loaded versions per model (stages.control): a request naming
        # a version no worker keeps loaded is refused here, with the reason infer would give.
        self._loaded_versions = loaded_versions
        self._output_topic = output_topic
        self._clock = clock
        self._validated = Codec(ValidatedRequestV1)

    def process(self, batch: Sequence[Record]) -> BatchOutcome:
        now = self._clock()
        outcome = BatchOutcome.empty()
        parsed: list[tuple[Record, Validated]] = []
        for record in batch:
            checked = self._envelope(record.value, now=now)
            if isinstance(checked, Invalid):
                outcome.rejected.append(_rejection(record, checked))
            else:
                parsed.append((record, checked))
        parsed, refused = self._processors.parse_all(parsed)  # builds inputs: stages.plugins
        outcome.rejected.extend(refused)
        clean = numerically_clean([(v.spec, v.request.inputs) for _, v in parsed])
        for (record, validated), ok in zip(parsed, clean, strict=True):
            # The exact check finds the reason and the message of a row the batch check refused.
            problem = None if ok else check_inputs(validated.spec, validated.request.inputs)
            if problem is not None:
                outcome.rejected.append(_rejection(record, problem))
            else:
                outcome.outputs.append(self._output(record, validated, now))
        return outcome

    def _envelope(self, value: bytes, *, now: float) -> Validated | Invalid:
        request = decode_request(value)
        if isinstance(request, Invalid):
            return request
        checked = check_envelope(request, self._catalog, now=now)
        if isinstance(checked, Invalid) or self._loaded_versions is None:
            return checked
        loaded = self._loaded_versions(checked.spec)
        if request.model_version is not None and request.model_version not in loaded:
            detail = (
                f"version {request.model_version!r} of model {request.model!r} is not loaded "
                f"(loaded: {', '.join(loaded)})"
            )
            return Invalid("unknown_model", detail, "$.model_version")
        return checked

    def _output(self, record: Record, validated: Validated, now: float) -> Output:
        return Output(
            topic=self._output_topic,
            key=record.key,
            value=self._validated.encode(validated.message(validated_at=now)),
            headers=output_headers(record, _SCHEMA),
        )


def _rejection(record: Record, invalid: Invalid) -> Rejection:
    return Rejection(record, invalid.reason, invalid.detail)

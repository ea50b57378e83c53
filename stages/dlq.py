"""Dead-letter records and the budget that stops a stage before it eats its input."""

from __future__ import annotations

from collections import deque
from collections.abc import Collection, Sequence
from typing import Final, get_args

from msgspec.structs import replace

from schemas import Headers
from schemas.validation import DLQ_ERROR_MAX_CHARS
from stages.errors import DlqLimitExceeded, PipelineReason
from stages.records import HeaderList, Output, Rejection, wire_size

# What counts against the budget at the first stage, where every client error is found:
# the rejections that say "the pipeline cannot process good input" (see stages.errors).
PIPELINE_REASONS: Final = frozenset(get_args(PipelineReason))
# ...and after it: a record that validate let through but is malformed or too large now
# means an upstream bug (or a model whose outputs are too large), not a bad request.
DOWNSTREAM_REASONS: Final = PIPELINE_REASONS | {"malformed", "too_large"}


def dlq_output(
    rejection: Rejection, *, stage: str, dlq_topic: str, max_bytes: int | None = None
) -> Output:
    """The rejected record's original key, value and headers, plus the ``dlq.*`` headers
    (``dlq.stage``: the rejection's own stage when it names one, else ``stage``).

    When that would exceed ``max_bytes`` (see :func:`~stages.records.wire_size`), the value
    is cut to fit and ``dlq.truncated`` gives its original length; if the original headers
    alone are too large, they are dropped as well (the ``dlq.*`` headers always stay, so
    the source coordinates say where the whole record is).
    """
    record = rejection.record
    dlq_headers: HeaderList = [
        (Headers.DLQ_STAGE, (rejection.stage or stage).encode()),
        (Headers.DLQ_REASON, rejection.reason.encode()),
        (Headers.DLQ_ERROR, rejection.detail[:DLQ_ERROR_MAX_CHARS].encode(errors="replace")),
        (Headers.DLQ_SOURCE_TOPIC, record.topic.encode()),
        (Headers.DLQ_SOURCE_PARTITION, str(record.partition).encode()),
        (Headers.DLQ_SOURCE_OFFSET, str(record.offset).encode()),
    ]
    output = Output(
        topic=dlq_topic,
        key=record.key,
        value=record.value,
        headers=[*record.headers, *dlq_headers],
    )
    if max_bytes is None or wire_size(output) <= max_bytes:
        return output
    truncated = (Headers.DLQ_TRUNCATED, str(len(record.value)).encode())
    for headers in ([*record.headers, *dlq_headers, truncated], [*dlq_headers, truncated]):
        room = max_bytes - wire_size(replace(output, value=b"", headers=headers))
        if room >= 0:
            return replace(output, value=record.value[:room], headers=headers)
    # Not even the dlq.* headers and the key fit: keep why and where, drop the rest.
    coordinates = [h for h in dlq_headers if h[0] != Headers.DLQ_ERROR]
    return Output(topic=dlq_topic, key=None, value=b"", headers=[*coordinates, truncated])


class DlqBudget:
    """Fails when more than ``max_ratio`` of the last ``window`` records were dead-lettered
    for one of ``counted_reasons`` (pipeline faults), once ``min_records`` were seen.

    Which reasons are pipeline faults depends on where the stage sits (see
    :data:`PIPELINE_REASONS` and :data:`DOWNSTREAM_REASONS`); whoever builds the stage says.
    """

    def __init__(
        self,
        *,
        stage: str,
        counted_reasons: Collection[str],
        max_ratio: float,
        window: int,
        min_records: int,
    ) -> None:
        self._stage = stage
        self._counted = frozenset(counted_reasons)
        self._max_ratio = max_ratio
        self._window = window
        self._min_records = min_records
        self._batches: deque[tuple[int, int]] = deque()
        self._seen = 0
        self._failed = 0

    def counts(self, rejection: Rejection) -> bool:
        return rejection.reason in self._counted

    def observe(self, batch_size: int, rejected: Sequence[Rejection]) -> None:
        """Account for one batch; raises :class:`DlqLimitExceeded` before it is published."""
        failed = sum(1 for r in rejected if self.counts(r))
        self._batches.append((batch_size, failed))
        self._seen += batch_size
        self._failed += failed
        while self._batches and self._seen - self._batches[0][0] >= self._window:
            size, fails = self._batches.popleft()
            self._seen -= size
            self._failed -= fails
        if self._seen >= self._min_records and self._failed > self._max_ratio * self._seen:
            example = next((r for r in rejected if self.counts(r)), None)
            detail = f" (latest: {example.reason}: {example.detail})" if example else ""
            raise DlqLimitExceeded(
                f"{self._stage}: {self._failed} of the last {self._seen} records failed, over "
                f"the limit of {self._max_ratio:.0%}; stopping instead of dead-lettering the "
                f"stream{detail}"
            )

"""Dead-letter records and the budget that stops a stage before it eats its input."""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from typing import Final

from schemas import Headers
from stages.errors import DlqLimitExceeded
from stages.records import HeaderList, Output, Rejection

# Rejections that say "the request is bad" (the client's fault). Any other rejection says
# "the pipeline cannot process good input" (a broken model, a bug) and counts against the
# budget.
CLIENT_REASONS: Final = frozenset(
    {"malformed", "unknown_model", "signature_mismatch", "non_finite", "out_of_range", "expired"}
)


def dlq_output(rejection: Rejection, *, stage: str, dlq_topic: str) -> Output:
    """The rejected record's original key, value and headers, plus the ``dlq.*`` headers."""
    record = rejection.record
    headers: HeaderList = [
        *record.headers,
        (Headers.DLQ_STAGE, stage.encode()),
        (Headers.DLQ_REASON, rejection.reason.encode()),
        (Headers.DLQ_ERROR, rejection.detail[:4000].encode()),
        (Headers.DLQ_SOURCE_TOPIC, record.topic.encode()),
        (Headers.DLQ_SOURCE_PARTITION, str(record.partition).encode()),
        (Headers.DLQ_SOURCE_OFFSET, str(record.offset).encode()),
    ]
    return Output(topic=dlq_topic, key=record.key, value=record.value, headers=headers)


class DlqBudget:
    """Fails when more than ``max_ratio`` of the last ``window`` records were dead-lettered
    for pipeline faults (see :data:`CLIENT_REASONS`), once ``min_records`` were seen.

    At the validate stage every rejection is the client's fault, so only ``stage_error``
    counts there; from infer on, a ``malformed`` input means an upstream bug and counts too.
    """

    def __init__(self, *, stage: str, max_ratio: float, window: int, min_records: int) -> None:
        self._stage = stage
        self._max_ratio = max_ratio
        self._window = window
        self._min_records = min_records
        self._batches: deque[tuple[int, int]] = deque()
        self._seen = 0
        self._failed = 0

    def counts(self, rejection: Rejection) -> bool:
        if self._stage == "validate":
            return rejection.reason not in CLIENT_REASONS
        return rejection.reason not in CLIENT_REASONS - {"malformed"}

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

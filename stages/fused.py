"""fused: validate, infer and persist on each batch, in one process (the fused topology).

Input: ``inference.requests`` and ``inference.requests.backfill`` (validate's). Output:
``inference.results`` and ``inference.shadow`` (infer's) and ``inference.stored``
(persist's); nothing goes to ``inference.validated``: each step's outputs become the next
step's records in memory. The runtime publishes what one batch made and commits its offsets
as one step of the guarantee: one Kafka transaction (exactly-once) or one produce and
commit (at-least-once), instead of one per stage.

The steps are the split topology's stage objects, unchanged: the same checks and the same
dead-letter reasons. Each step runs isolated (:mod:`stages.isolation`): a record that makes
a step raise is dead-lettered (``stage_error``) and the rest of the batch goes on; a result
over the size limit dead-letters its record (``too_large``) before persist sees it. A
step's :class:`~stages.errors.SinkUnavailable` (Redis down) reaches the runtime, which
retries the whole batch: nothing is dead-lettered, validate and infer run again.

Dead letters
------------
Whatever step refuses a record, its dead letter is the *consumed* record (the request: key,
value and headers as read, and its topic, partition and offset) and ``dlq.stage`` names the
step (``validate``, ``infer`` or ``persist``). Every in-memory record carries the
coordinates of the consumed record it comes from, so a refusal maps back to it, and the
runtime's offsets cover the whole batch whatever the steps do.

Which output comes from which record: a stage does not say, but each gives an output its
record's key. Outputs are matched to the step's records that were not refused, per key,
first come first served. That is exact for validate (its outputs keep the records' order),
and for infer whenever one key's records in a batch run in one model version (records of
one key and model are routed alike); two records of one key run by different versions in one
batch may swap source coordinates, which matters only if persist then refuses one (a
result infer just wrote that persist cannot store: a bug). An output that matches no record
fails the batch, which the runtime then replays one record at a time.

Redis before the commit
-----------------------
persist writes Redis (and announces the result) while the batch is processed, before the
batch's transaction commits. A client may thus read a result from Redis whose Kafka
transaction is later aborted and replayed; the replay stores the same request id under the
same key again. The guarantee stated for the split topology holds: nothing is lost, and a
read_committed reader of ``inference.results`` sees each result once (exactly-once).
"""

from __future__ import annotations

from collections import defaultdict, deque
from collections.abc import Sequence
from typing import TYPE_CHECKING, NamedTuple, cast

from stages.isolation import process_isolating, process_within_limit
from stages.records import BatchOutcome, HeaderList, Output, Record, Rejection

if TYPE_CHECKING:
    from stages.runtime import Stage

Coordinates = tuple[str, int, int]  # topic, partition, offset of a consumed record
RecordHeaders = tuple[tuple[str, bytes], ...]


class FusedStage:
    """``validate``, then ``infer`` on what it passed, then ``persist`` on the results."""

    name = "fused"

    def __init__(
        self,
        *,
        validate: Stage,
        infer: Stage,
        persist: Stage,
        results_topic: str,
        max_record_bytes: int = 1_000_000,
    ) -> None:
        self._validate = validate
        self._infer = infer
        self._persist = persist
        self._results_topic = results_topic
        self._max_bytes = max_record_bytes

    def process(self, batch: Sequence[Record]) -> BatchOutcome:
        outcome = BatchOutcome.empty()
        sources = {_coordinates(r): r for r in batch}
        # Validate's outputs are never produced: no size limit applies to them.
        validated = self._step(self._validate, batch, sources, outcome, limit=False)
        requests = _records_of(validated.outputs, validated.kept, self._validate.name)
        # Infer's are: one over the limit is refused here, before persist stores it.
        inferred = self._step(self._infer, requests, sources, outcome, limit=True)
        outcome.outputs.extend(inferred.outputs)  # results and shadow results
        results = [o for o in inferred.outputs if o.topic == self._results_topic]
        to_store = _records_of(results, inferred.kept, self._infer.name)
        # Stored notices are small; the runtime checks every output's size anyway.
        stored = self._step(self._persist, to_store, sources, outcome, limit=False)
        outcome.outputs.extend(stored.outputs)
        return outcome

    def _step(
        self,
        stage: Stage,
        records: Sequence[Record],
        sources: dict[Coordinates, Record],
        outcome: BatchOutcome,
        *,
        limit: bool,
    ) -> _Step:
        """Run ``stage`` on ``records``; its refusals join ``outcome`` as dead letters of
        the consumed records they stand for."""
        if not records:
            return _Step([], [])
        done = (
            process_within_limit(stage, records, self._max_bytes)
            if limit
            else process_isolating(stage, records)
        )
        if not done.rejected:
            return _Step(done.outputs, list(records))
        refused = {_coordinates(r.record) for r in done.rejected}
        outcome.rejected.extend(_of_source(r, sources, stage.name) for r in done.rejected)
        return _Step(done.outputs, [r for r in records if _coordinates(r) not in refused])


class _Step(NamedTuple):
    """What one step made: its ``outputs``, and ``kept``, its records it did not refuse."""

    outputs: list[Output]
    kept: list[Record]


def _records_of(outputs: Sequence[Output], kept: Sequence[Record], step: str) -> list[Record]:
    """``outputs`` as records, each with the coordinates of the record of ``kept`` it came
    from (see the module docstring)."""
    aligned = len(outputs) == len(kept) and all(
        o.key == r.key for o, r in zip(outputs, kept, strict=True)
    )
    sources = kept if aligned else _matched(outputs, kept, step)
    return [
        Record(
            topic=source.topic,
            partition=source.partition,
            offset=source.offset,
            key=output.key,
            value=output.value,
            headers=_header_tuple(output.headers),
            timestamp_ms=source.timestamp_ms,
        )
        for output, source in zip(outputs, sources, strict=True)
    ]


def _matched(outputs: Sequence[Output], kept: Sequence[Record], step: str) -> list[Record]:
    """The record of ``kept`` each output came from: matched per key, first come first
    served (outputs one to one with ``kept`` in order, the usual case, skip this)."""
    waiting: dict[bytes | None, deque[Record]] = defaultdict(deque)
    for record in kept:
        waiting[record.key].append(record)
    sources = []
    for output in outputs:
        queue = waiting.get(output.key)
        if not queue:
            raise LookupError(f"{step}: an output with key {output.key!r} matches no record")
        sources.append(queue.popleft())
    return sources


def _of_source(rejection: Rejection, sources: dict[Coordinates, Record], step: str) -> Rejection:
    """``rejection`` of the consumed record it stands for, naming the step that refused it."""
    source = sources[_coordinates(rejection.record)]
    return Rejection(source, rejection.reason, rejection.detail, stage=step)


def _coordinates(record: Record) -> Coordinates:
    return record.topic, record.partition, record.offset


def _header_tuple(headers: HeaderList) -> RecordHeaders:
    """An output's headers as a consumed record has them (bytes values). The stages make
    ``(str, bytes)`` pairs: those are kept as they are."""
    for _, value in headers:
        if value.__class__ is not bytes:
            return tuple(
                (name, value.encode() if isinstance(value, str) else value or b"")
                for name, value in headers
            )
    return cast(RecordHeaders, tuple(headers))  # every value is bytes: checked above

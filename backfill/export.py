"""File sink: one backfill's results from ``inference.results`` to Parquet or JSON lines.

``streaminfer export --backfill-id ID --to FILE`` reads ``inference.results`` from the
beginning up to its end offsets at the start (``read_committed``), keeps the results whose
``attributes.backfill_id`` is ID, and writes one row per input: a result id seen twice (a
resumed backfill re-sends the rows Kafka acknowledged after its last checkpoint, and the
``at-least-once`` guarantee may repeat results) is written once and counted as a duplicate.
Rows are in topic order; ``file`` and ``row`` join them back to the input.

Columns: ``id, backfill_id, file, row, original_id`` (replays), ``model, model_version,
label, scores`` (label -> score), ``created_at, inferred_at`` (epoch s) and one
``output_<name>`` per model output (a scalar, or the flattened values).

Completeness comes from the checkpoint: every row of its done prefix was either rejected
(the rejects report), or acknowledged by Kafka and so must end up as a result or in
``inference.dlq`` (found by the ``backfill_id`` attribute of the dead-lettered record, best
effort). ``--wait S`` keeps reading both topics until nothing is missing or S seconds pass.
The file is written aside and renamed when the export ends: a file under the name given is
never half-written.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Final

from confluent_kafka import Consumer, Message

from backfill.checkpoint import read_rejects
from backfill.completeness import ExportReport, ExportTally, SourceTally, report_for
from backfill.context import BackfillContext
from backfill.plan import UsageError, checkpoint_store
from backfill.topics import PartitionRange
from kafkaio.dead_letters import decode_head, read_dead_letter
from kafkaio.offsets import watermarks
from schemas import Codec, DecodeError, ResultV1, tensor_to_array
from sinks import files
from sinks.files import DestinationError, ResultWriter, open_writer

_FOLLOW_END: Final = 1 << 62  # "no end": --wait reads whatever arrives


def check_destination(path: Path) -> None:
    """:class:`UsageError` unless ``path`` names a format and a directory that exist."""
    try:
        files.check_destination(path)
    except DestinationError as exc:
        raise UsageError(str(exc)) from None


def export_backfill(
    context: BackfillContext,
    backfill_id: str,
    to: Path,
    *,
    wait_s: float = 0.0,
    show: int = 20,
    clock: Callable[[], float] = time.monotonic,
) -> ExportReport:
    """Write ``backfill_id``'s results to ``to`` and check them against its checkpoint."""
    store = checkpoint_store(context)
    if not store.exists(backfill_id):
        raise UsageError(f"no checkpoint for {backfill_id} in {store.directory}")
    checkpoint = store.load(backfill_id)
    rejected_rows: dict[str, list[int]] = {}
    for line in read_rejects(store.rejects_path(backfill_id)):
        rejected_rows.setdefault(line.source, []).append(line.row)
    tally = ExportTally(
        backfill_id=backfill_id,
        sources={
            s.name: SourceTally.of(s, backfill_id, rejected_rows.get(s.name, []))
            for s in checkpoint.sources
        },
        rejected=checkpoint.rejected,
    )
    check_destination(to)
    writer = open_writer(to)
    try:
        _Export(context, tally, writer).run(wait_s=wait_s, clock=clock)
    except BaseException:
        writer.abort()
        raise
    writer.close()
    return report_for(checkpoint, tally, to, show)


class _Export:
    """Reads results and dead letters into the tally and the writer."""

    def __init__(self, context: BackfillContext, tally: ExportTally, writer: ResultWriter) -> None:
        self._tally = tally
        self._writer = writer
        self._results = Codec(ResultV1)
        self._ranges = {
            "results": self._range(context, context.topics.results),
            "dlq": self._range(context, context.topics.dlq),
        }

    @staticmethod
    def _range(context: BackfillContext, topic: str) -> tuple[PartitionRange, Consumer]:
        consumer = context.new_reader()
        marks = watermarks(consumer, topic)
        starts = {p: low for p, (low, _high) in marks.items()}
        ends = {p: high for p, (_low, high) in marks.items()}
        return PartitionRange(consumer, topic, starts, ends), consumer

    def run(self, *, wait_s: float, clock: Callable[[], float]) -> None:
        try:
            for batch in self._ranges["results"][0].batches():
                self._add_results(batch)
            for batch in self._ranges["dlq"][0].batches():
                self._add_dead_letters(batch)
            if wait_s > 0 and not self._tally.complete():
                self._follow(clock() + wait_s, clock)
        finally:
            for _range, consumer in self._ranges.values():
                consumer.close()

    def _follow(self, deadline: float, clock: Callable[[], float]) -> None:
        """Read on as records arrive (each read blocks up to 0.5 s) until complete."""
        results, dlq = self._ranges["results"][0], self._ranges["dlq"][0]
        for window in (results, dlq):
            window.extend({p: _FOLLOW_END for p in window.partitions})
        while not self._tally.complete() and clock() < deadline:
            self._add_results(results.read(timeout_s=0.5))
            self._add_dead_letters(dlq.read(timeout_s=0))

    def _add_results(self, batch: list[Message]) -> None:
        """Write this backfill's new results; anything else on the topic (garbage bytes,
        other backfills, forged attributes, see :mod:`backfill.completeness`) is skipped."""
        for message in batch:
            value = message.value()
            head = decode_head(value) if isinstance(value, bytes) else None
            if head is None or head.attributes.get("backfill_id") != self._tally.backfill_id:
                continue
            result = self._result(value)
            if result is None:  # a request-shaped or broken record: not a result
                self._tally.foreign += 1
                continue
            admission = self._tally.admit(result.id, result.attributes)
            if admission == "duplicate":
                self._tally.duplicates += 1
            elif admission == "new":
                self._writer.add(result)
                self._tally.written += 1

    def _result(self, value: bytes | None) -> ResultV1 | None:
        """``value`` as a result whose outputs are readable arrays, else None."""
        try:
            result = self._results.decode(value or b"")
            for tensor in result.outputs.values():
                tensor_to_array(tensor)  # what the writer does; a broken tensor fails here
        except (DecodeError, RecursionError, ValueError, TypeError, OverflowError):
            return None
        return result

    def _add_dead_letters(self, batch: list[Message]) -> None:
        for message in batch:
            letter = read_dead_letter(message)  # never raises, whatever the record holds
            head = letter.head  # of the original request, best effort
            if head is not None and head.attributes.get("backfill_id") == self._tally.backfill_id:
                self._tally.dead_letter(head.id, head.attributes, letter)

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

import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Final, Protocol

import msgspec
import numpy as np
import numpy.typing as npt
import pyarrow as pa
import pyarrow.parquet as pq
from confluent_kafka import Consumer, Message

from ingest.backfill.checkpoint import read_rejects
from ingest.backfill.completeness import ExportReport, ExportTally, SourceTally, report_for
from ingest.backfill.plan import UsageError, checkpoint_store
from ingest.backfill.topics import PartitionRange, decode_head, range_reader, watermarks
from schemas import Codec, DecodeError, ResultV1, tensor_to_array
from streaminfer.settings import Settings

_FOLLOW_END: Final = 1 << 62  # "no end": --wait reads whatever arrives


# --- writers ------------------------------------------------------------------------------


class ResultWriter(Protocol):
    """Where exported rows go; nothing is visible under ``path`` before :meth:`close`."""

    path: Path

    def add(self, result: ResultV1) -> None: ...

    def flush(self) -> None: ...

    def close(self) -> None:
        """Flush, and move the finished file into place."""
        ...

    def abort(self) -> None:
        """Drop what was written."""
        ...


def check_destination(path: Path) -> None:
    """:class:`UsageError` unless ``path`` names a format and a directory that exist."""
    if path.suffix.lower() not in (".parquet", ".jsonl", ".ndjson"):
        raise UsageError(f"{path}: export writes *.parquet or *.jsonl")
    if not path.parent.is_dir():
        raise UsageError(f"{path.parent}: no such directory")


def open_writer(path: Path) -> ResultWriter:
    check_destination(path)
    if path.suffix.lower() == ".parquet":
        return ParquetResultWriter(path)
    return JsonLinesResultWriter(path)


def _aside(path: Path) -> Path:
    return path.with_name(f".{path.name}.{os.getpid()}.partial")


def _base_fields(result: ResultV1) -> dict[str, Any]:
    attributes = result.attributes
    row = attributes.get("row", "")
    return {
        "id": result.id,
        "backfill_id": attributes.get("backfill_id"),
        "file": attributes.get("file"),
        "row": int(row) if row.isdigit() else None,
        "original_id": attributes.get("original_id"),
        "model": result.model,
        "model_version": result.model_version,
        "label": result.label,
        "scores": result.scores,
        "created_at": result.created_at,
        "inferred_at": result.timings.get("inferred"),
    }


_BASE_SCHEMA: Final = [
    ("id", pa.string()),
    ("backfill_id", pa.string()),
    ("file", pa.string()),
    ("row", pa.int64()),
    ("original_id", pa.string()),
    ("model", pa.string()),
    ("model_version", pa.string()),
    ("label", pa.string()),
    ("scores", pa.map_(pa.string(), pa.float64())),
    ("created_at", pa.float64()),
    ("inferred_at", pa.float64()),
]


class JsonLinesResultWriter:
    """One JSON object per line."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._aside = _aside(path)
        self._file = self._aside.open("wb")
        self._encoder = msgspec.json.Encoder()

    def add(self, result: ResultV1) -> None:
        row = _base_fields(result)
        for name, tensor in result.outputs.items():
            row[f"output_{name}"] = tensor_to_array(tensor).tolist()
        self._file.write(self._encoder.encode(row) + b"\n")

    def flush(self) -> None:
        self._file.flush()

    def close(self) -> None:
        self._file.close()
        os.replace(self._aside, self.path)

    def abort(self) -> None:
        self._file.close()
        self._aside.unlink(missing_ok=True)


class ParquetResultWriter:
    """Buffers rows column-wise and writes a row group per ``rows_per_group``; the output
    columns' types come from the first result."""

    def __init__(self, path: Path, *, rows_per_group: int = 65_536) -> None:
        self.path = path
        self._aside = _aside(path)
        self._rows_per_group = rows_per_group
        self._rows: list[dict[str, Any]] = []
        self._outputs: dict[str, list[npt.NDArray[Any]]] = {}
        self._schema: pa.Schema | None = None
        self._writer: pq.ParquetWriter | None = None

    def add(self, result: ResultV1) -> None:
        if self._schema is None:
            self._schema = _schema_for(result)
        self._rows.append(_base_fields(result))
        for name, tensor in result.outputs.items():
            self._outputs.setdefault(name, []).append(tensor_to_array(tensor))
        if len(self._rows) >= self._rows_per_group:
            self.flush()

    def flush(self) -> None:
        if not self._rows or self._schema is None:
            return
        columns = {name: [row[name] for row in self._rows] for name, _ in _BASE_SCHEMA}
        columns["scores"] = [None if s is None else list(s.items()) for s in columns["scores"]]
        arrays = [pa.array(columns[name], type=type_) for name, type_ in _BASE_SCHEMA]
        arrays += [_output_array(values) for values in self._outputs.values()]
        table = pa.Table.from_arrays(arrays, schema=self._schema)
        if self._writer is None:
            self._writer = pq.ParquetWriter(self._aside, self._schema)
        self._writer.write_table(table)
        self._rows, self._outputs = [], {}

    def close(self) -> None:
        self.flush()
        if self._writer is None:  # no results at all: an empty file with the base columns
            self._writer = pq.ParquetWriter(self._aside, self._schema or pa.schema(_BASE_SCHEMA))
        self._writer.close()
        os.replace(self._aside, self.path)

    def abort(self) -> None:
        if self._writer is not None:
            self._writer.close()
        self._aside.unlink(missing_ok=True)


def _schema_for(result: ResultV1) -> pa.Schema:
    fields = list(_BASE_SCHEMA)
    for name, tensor in result.outputs.items():
        value_type = pa.from_numpy_dtype(np.dtype(tensor.dtype))
        fields.append((f"output_{name}", value_type if not tensor.shape else pa.list_(value_type)))
    return pa.schema(fields)


def _output_array(values: list[npt.NDArray[Any]]) -> pa.Array:
    stacked = np.stack(values)
    if stacked.ndim == 1:
        return pa.array(stacked)
    flat = stacked.reshape(len(values), -1)
    offsets = np.arange(0, flat.size + 1, flat.shape[1], dtype=np.int32)
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(flat.reshape(-1)))


# --- the export ---------------------------------------------------------------------------


def export_backfill(
    settings: Settings,
    backfill_id: str,
    to: Path,
    *,
    wait_s: float = 0.0,
    show: int = 20,
    clock: Callable[[], float] = time.monotonic,
) -> ExportReport:
    """Write ``backfill_id``'s results to ``to`` and check them against its checkpoint."""
    store = checkpoint_store(settings)
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
    writer = open_writer(to)
    try:
        _Export(settings, tally, writer).run(wait_s=wait_s, clock=clock)
    except BaseException:
        writer.abort()
        raise
    writer.close()
    return report_for(checkpoint, tally, to, show)


class _Export:
    """Reads results and dead letters into the tally and the writer."""

    def __init__(self, settings: Settings, tally: ExportTally, writer: ResultWriter) -> None:
        self._tally = tally
        self._writer = writer
        self._results = Codec(ResultV1)
        self._ranges = {
            "results": self._range(settings, settings.topics.results),
            "dlq": self._range(settings, settings.topics.dlq),
        }

    @staticmethod
    def _range(settings: Settings, topic: str) -> tuple[PartitionRange, Consumer]:
        consumer = range_reader(settings)
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
        for message in batch:
            head = decode_head(message.value())
            if head is None or head.attributes.get("backfill_id") != self._tally.backfill_id:
                continue
            if not self._tally.first_time(head.id, head.attributes):
                self._tally.duplicates += 1
                continue
            try:
                self._writer.add(self._results.decode(message.value() or b""))
            except DecodeError:
                continue  # a request-shaped record on the results topic: not a result
            self._tally.written += 1

    def _add_dead_letters(self, batch: list[Message]) -> None:
        for message in batch:
            head = decode_head(message.value())  # the original request, best effort
            if head is not None and head.attributes.get("backfill_id") == self._tally.backfill_id:
                self._tally.dead_letter(head.id, head.attributes, message)

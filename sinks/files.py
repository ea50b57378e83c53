"""File writers: results to Parquet or JSON lines, written aside and renamed on close.

``backfill.export`` uses them to write one backfill's results; nothing under the final name
is ever half-written.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Final, Protocol

import msgspec
import numpy as np
import numpy.typing as npt
import pyarrow as pa
import pyarrow.parquet as pq

from schemas import ResultV1, tensor_to_array


class DestinationError(ValueError):
    """The export destination names no supported format or a directory that does not exist."""


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
    """:class:`DestinationError` unless ``path`` names a format and a directory that exist."""
    if path.suffix.lower() not in (".parquet", ".jsonl", ".ndjson"):
        raise DestinationError(f"{path}: export writes *.parquet or *.jsonl")
    if not path.parent.is_dir():
        raise DestinationError(f"{path.parent}: no such directory")


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
        "row": int(row) if row.isascii() and row.isdigit() and len(row) <= 19 else None,
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

"""Streaming file readers: CSV and Parquet through pyarrow record batches, JSON lines line by
line. None of them holds more than one batch of a file in memory.

Row numbers are 1-based positions of records in the file: the header and blank lines do not
count. In a CSV file without blank lines or quoted line breaks, row ``N`` is line ``N + 1``;
in a JSON lines file without blank lines, row ``N`` is line ``N``; in Parquet, row ``N`` is
the N-th row across row groups.

A reader yields :class:`Chunk` s: the rows that became arrays (one array per model input, a
row per request) and the rows that could not (:class:`Reject`, with row number and why),
both in row order. ``after_row`` skips rows already done (``--resume``).
"""

from __future__ import annotations

import csv
import gzip
import io
from collections import deque
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any, Final, Literal, Protocol

import msgspec
import numpy as np
import numpy.typing as npt
import pyarrow as pa
import pyarrow.csv as pa_csv
import pyarrow.parquet as pq

from backfill.convert import Chunk, Reject, arrow_chunk, empty_inputs, records_chunk
from backfill.mapping import WHOLE_RECORD, Mapping, MappingError

Format = Literal["csv", "jsonl", "parquet"]
FORMATS: Final[tuple[Format, ...]] = ("csv", "jsonl", "parquet")
_SUFFIXES: Final[dict[str, Format]] = {
    ".csv": "csv",
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".json": "jsonl",
    ".parquet": "parquet",
    ".pq": "parquet",
}


class FileReader(Protocol):
    """One input file, read in chunks."""

    path: Path
    format: Format

    def columns(self) -> list[str]:
        """Column names in file order (what the mapping rules look at)."""
        ...

    def estimate_rows(self) -> int | None:
        """Rows in the file (exact for Parquet, a line count otherwise), for the ETA."""
        ...

    def chunks(self, mapping: Mapping, *, after_row: int = 0) -> Iterator[Chunk]:
        """Every row after ``after_row``, converted for ``mapping``."""
        ...


def detect_format(path: Path) -> Format:
    """The format named by the file's extension (``.gz`` is looked through)."""
    suffixes = [s.lower() for s in path.suffixes]
    if suffixes and suffixes[-1] == ".gz":
        suffixes.pop()
    found = _SUFFIXES.get(suffixes[-1]) if suffixes else None
    if found is None:
        raise MappingError(f"{path}: cannot tell the format from the name; use --format")
    return found


def open_reader(path: Path, fmt: Format, *, batch_rows: int = 4096) -> FileReader:
    if fmt == "csv":
        return CsvReader(path, batch_rows=batch_rows)
    if fmt == "parquet":
        return ParquetReader(path, batch_rows=batch_rows)
    return JsonLinesReader(path, batch_rows=batch_rows)


# --- CSV ----------------------------------------------------------------------------------


class CsvReader:
    """pyarrow's streaming CSV reader; every mapped column is read as text and parsed here,
    so one bad value rejects its row rather than failing the whole block."""

    format: Format = "csv"

    def __init__(self, path: Path, *, batch_rows: int = 4096, block_bytes: int = 1 << 20) -> None:
        self.path = path
        self._batch_rows = batch_rows  # pyarrow sizes CSV batches by bytes (block_bytes)
        self._block_bytes = block_bytes

    def columns(self) -> list[str]:
        with _open_text(self.path) as text:
            header = next(csv.reader(text), None)
        if not header:
            raise MappingError(f"{self.path}: no header row")
        return header

    def estimate_rows(self) -> int | None:
        return max(_count_lines(self.path) - 1, 0)

    def chunks(self, mapping: Mapping, *, after_row: int = 0) -> Iterator[Chunk]:
        skipped: deque[Reject] = deque()
        reader = self._open(mapping, skipped)
        next_row = 1
        for batch in reader:
            rows, rejects, next_row = _number_rows(next_row, batch.num_rows, skipped)
            yield arrow_chunk(batch, rows, mapping, rejects=rejects, after_row=after_row)
        if skipped:  # invalid rows after the last batch
            tail = [r for r in skipped if r.row > after_row]
            yield Chunk(rows=np.empty(0, np.int64), inputs=empty_inputs(mapping), rejects=tail)

    def _open(self, mapping: Mapping, skipped: deque[Reject]) -> pa_csv.CSVStreamingReader:
        def on_invalid(row: Any) -> str:
            # row.number counts non-blank lines including the header, so it is our row + 1.
            text = str(row.text)[:80]
            detail = f"{row.actual_columns} fields, header has {row.expected_columns}: {text!r}"
            skipped.append(Reject(int(row.number) - 1, "unparseable", detail))
            return "skip"

        names = sorted({c for mapped in mapping for c in mapped.columns})
        return pa_csv.open_csv(
            str(self.path),
            read_options=pa_csv.ReadOptions(use_threads=False, block_size=self._block_bytes),
            parse_options=pa_csv.ParseOptions(invalid_row_handler=on_invalid),
            convert_options=pa_csv.ConvertOptions(
                column_types={name: pa.string() for name in names},
                include_columns=names,
                strings_can_be_null=False,
            ),
        )


def _number_rows(
    first: int, count: int, skipped: deque[Reject]
) -> tuple[npt.NDArray[np.int64], list[Reject], int]:
    """Row numbers of a batch of ``count`` parsed rows starting at ``first``, stepping over
    the invalid rows pyarrow skipped (``skipped``, ascending; consumed here). Also returns
    the invalid rows met and the number of the row after the batch."""
    if not skipped or skipped[0].row >= first + count:
        return np.arange(first, first + count, dtype=np.int64), [], first + count
    rows: list[int] = []
    rejects: list[Reject] = []
    row = first
    while len(rows) < count:
        if skipped and skipped[0].row == row:
            rejects.append(skipped.popleft())
        else:
            rows.append(row)
        row += 1
    return np.asarray(rows, dtype=np.int64), rejects, row


# --- Parquet ------------------------------------------------------------------------------


class ParquetReader:
    """``ParquetFile.iter_batches``; whole row groups before ``after_row`` are not read."""

    format: Format = "parquet"

    def __init__(self, path: Path, *, batch_rows: int = 4096) -> None:
        self.path = path
        self._batch_rows = batch_rows

    def columns(self) -> list[str]:
        return list(pq.ParquetFile(self.path).schema_arrow.names)

    def estimate_rows(self) -> int | None:
        return int(pq.ParquetFile(self.path).metadata.num_rows)

    def chunks(self, mapping: Mapping, *, after_row: int = 0) -> Iterator[Chunk]:
        with pq.ParquetFile(self.path) as source:
            groups, next_row = _row_groups_after(source.metadata, after_row)
            if not groups:
                return
            names = sorted({c for mapped in mapping for c in mapped.columns})
            batches = source.iter_batches(
                batch_size=self._batch_rows, row_groups=groups, columns=names, use_threads=False
            )
            for batch in batches:
                rows = np.arange(next_row, next_row + batch.num_rows, dtype=np.int64)
                next_row += batch.num_rows
                yield arrow_chunk(batch, rows, mapping, after_row=after_row)


def _row_groups_after(metadata: Any, after_row: int) -> tuple[list[int], int]:
    """Row groups holding rows after ``after_row``, and the row number the first one starts at."""
    first_row = 1
    for group in range(metadata.num_row_groups):
        size = metadata.row_group(group).num_rows
        if first_row + size - 1 > after_row:
            return list(range(group, metadata.num_row_groups)), first_row
        first_row += size
    return [], first_row


# --- JSON lines ---------------------------------------------------------------------------


class JsonLinesReader:
    """One JSON object per line (keys are columns), or one JSON array per line (the values
    of a one-input model). Lines are decoded only after ``after_row``."""

    format: Format = "jsonl"

    def __init__(self, path: Path, *, batch_rows: int = 4096) -> None:
        self.path = path
        self._batch_rows = batch_rows

    def columns(self) -> list[str]:
        with _open_binary(self.path) as lines:
            for line in lines:
                if not line.strip():
                    continue
                try:
                    record = msgspec.json.decode(line)
                except msgspec.DecodeError:
                    continue  # reported as a reject when read; look for a readable one
                if isinstance(record, dict):
                    return list(record)
                if isinstance(record, list):
                    return [WHOLE_RECORD]
                raise MappingError(f"{self.path}: records must be JSON objects or arrays")
        raise MappingError(f"{self.path}: no readable JSON record")

    def estimate_rows(self) -> int | None:
        return _count_lines(self.path)

    def chunks(self, mapping: Mapping, *, after_row: int = 0) -> Iterator[Chunk]:
        rows: list[int] = []
        records: list[Any] = []
        rejects: list[Reject] = []
        for row, line in self._numbered_lines(after_row):
            try:
                records.append(msgspec.json.decode(line))
                rows.append(row)
            except msgspec.DecodeError as exc:
                rejects.append(Reject(row, "unparseable", f"not JSON: {exc}"))
            if len(rows) + len(rejects) >= self._batch_rows:
                yield records_chunk(rows, records, mapping, rejects)
                rows, records, rejects = [], [], []
        if rows or rejects:
            yield records_chunk(rows, records, mapping, rejects)

    def _numbered_lines(self, after_row: int) -> Iterator[tuple[int, bytes]]:
        row = 0
        with _open_binary(self.path) as lines:
            for line in lines:
                if not line.strip():
                    continue
                row += 1
                if row > after_row:
                    yield row, line


# --- files ----------------------------------------------------------------------------------


def _open_binary(path: Path) -> gzip.GzipFile | io.BufferedReader:
    if path.suffix.lower() == ".gz":
        return gzip.open(path, "rb")
    return path.open("rb")


def _open_text(path: Path) -> IO[str]:
    # utf-8-sig: a byte-order mark is not part of the first column's name.
    return io.TextIOWrapper(_open_binary(path), encoding="utf-8-sig", newline="")


def _count_lines(path: Path) -> int:
    """Non-blank lines are what rows count, but a newline count is close and ~1 GB/s."""
    count = 0
    last = b"\n"
    with _open_binary(path) as data:
        while block := data.read(1 << 20):
            count += block.count(b"\n")
            last = block[-1:]
    return count + (last != b"\n")

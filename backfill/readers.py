"""Streaming file readers: CSV and Parquet through pyarrow record batches, JSON lines line by
line. None of them holds more than one batch of a file in memory.

Row numbers are 1-based positions of records in the file: the header and blank lines do not
count. In a CSV file without blank lines or quoted line breaks, row ``N`` is line ``N + 1``;
in a JSON lines file without blank lines, row ``N`` is line ``N``; in Parquet, row ``N`` is
the N-th row across row groups.

No row stops a file: a CSV record or JSON line over ``max_row_bytes`` is skipped as it
streams past (never held whole) and rejected as ``too_large``; a line that does not parse,
nests too deep or holds a number no float can is rejected; Parquet lists are measured before
they become Python objects (:mod:`backfill.convert`).

A reader yields :class:`Chunk` s: the rows that became arrays (one array per model input, a
row per request) and the rows that could not (:class:`Reject`, with row number and why),
both in row order. ``after_row`` skips rows already done (``--resume``).
"""

from __future__ import annotations

import csv
import gzip
import io
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any, Final, Literal, Protocol

import msgspec
import numpy as np
import numpy.typing as npt
import pyarrow as pa
import pyarrow.csv as pa_csv
import pyarrow.parquet as pq

from backfill.convert import MAX_CELL_BYTES, Chunk, Reject, arrow_chunk, records_chunk
from backfill.csvrecords import Record, RecordCutter, TooLarge
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


def open_reader(
    path: Path, fmt: Format, *, batch_rows: int = 4096, max_row_bytes: int = MAX_CELL_BYTES
) -> FileReader:
    if fmt == "csv":
        return CsvReader(path, batch_rows=batch_rows, max_row_bytes=max_row_bytes)
    if fmt == "parquet":
        return ParquetReader(path, batch_rows=batch_rows, max_row_bytes=max_row_bytes)
    return JsonLinesReader(path, batch_rows=batch_rows, max_row_bytes=max_row_bytes)


class _Reader:
    """What every reader is built from: the file, the rows in a chunk, and the size limit of
    a record (CSV, JSON lines) or of a cell (Parquet)."""

    def __init__(
        self, path: Path, *, batch_rows: int = 4096, max_row_bytes: int = MAX_CELL_BYTES
    ) -> None:
        self.path = path
        self._batch_rows = batch_rows
        self._max_row_bytes = max_row_bytes


# --- CSV ----------------------------------------------------------------------------------


class CsvReader(_Reader):
    """Records cut by :class:`RecordCutter` (so one oversized record is a reject, not the end
    of the file), parsed by pyarrow a batch at a time. Every mapped column is read as text
    and parsed here, so one bad value rejects its row rather than failing the batch; a batch
    pyarrow refuses as a whole is parsed in halves until the refused records are found."""

    format: Format = "csv"

    def columns(self) -> list[str]:
        with _open_binary(self.path) as data:
            for record in RecordCutter(data, max_bytes=self._max_row_bytes).records():
                if isinstance(record, TooLarge):
                    raise MappingError(f"{self.path}: the header row is over {record.size:,} bytes")
                text = record.decode("utf-8-sig", errors="replace")
                try:
                    return next(csv.reader([text]))
                except csv.Error as exc:
                    raise MappingError(f"{self.path}: unreadable header row: {exc}") from None
        raise MappingError(f"{self.path}: no header row")

    def estimate_rows(self) -> int | None:
        return max(_count_lines(self.path) - 1, 0)

    def chunks(self, mapping: Mapping, *, after_row: int = 0) -> Iterator[Chunk]:
        names = sorted({c for mapped in mapping for c in mapped.columns})
        with _open_binary(self.path) as data:
            records = RecordCutter(data, max_bytes=self._max_row_bytes).records()
            header = next((r for r in records if isinstance(r, bytes)), None)
            if header is None:
                return
            parser = _CsvBatchParser(header.removeprefix(_BOM), names)
            for rows, batch, rejects in parser.batches(
                records, self._batch_rows, self._max_row_bytes, after_row
            ):
                yield arrow_chunk(
                    batch, rows, mapping, rejects=rejects, max_cell_bytes=self._max_row_bytes
                )


_BOM: Final = b"\xef\xbb\xbf"
_CsvBatch = tuple[npt.NDArray[np.int64], pa.RecordBatch, list[Reject]]


class _CsvBatchParser:
    """Records -> Arrow batches of the ``names`` columns as text, with a reject per record
    pyarrow cannot read."""

    def __init__(self, header: bytes, names: list[str]) -> None:
        self._header = header
        self._convert = pa_csv.ConvertOptions(
            column_types={name: pa.string() for name in names},
            include_columns=names,
            strings_can_be_null=False,
        )

    def batches(
        self, records: Iterator[Record], batch_rows: int, batch_bytes: int, after_row: int
    ) -> Iterator[_CsvBatch]:
        """Groups of up to ``batch_rows`` records (or ``batch_bytes``), parsed; rows up to
        ``after_row`` are counted but not parsed."""
        rows: list[int] = []
        texts: list[bytes] = []
        rejects: list[Reject] = []
        size = 0
        for row, record in enumerate(records, start=1):
            if row <= after_row:
                continue
            if isinstance(record, TooLarge):
                detail = f"record of {record.size:,} bytes or more, over the {batch_bytes:,} limit"
                rejects.append(Reject(row, "too_large", detail))
            else:
                rows.append(row)
                texts.append(record)
                size += len(record)
            if len(rows) + len(rejects) >= batch_rows or size >= batch_bytes:
                yield self._parsed(rows, texts, rejects)
                rows, texts, rejects, size = [], [], [], 0
        if rows or rejects:
            yield self._parsed(rows, texts, rejects)

    def _parsed(self, rows: list[int], texts: list[bytes], rejects: list[Reject]) -> _CsvBatch:
        tables, refused = self._parse(rows, texts)
        table = pa.concat_tables(tables) if tables else self._empty()
        kept = sorted(set(rows) - {r.row for r in refused})
        batch = table.combine_chunks().to_batches()
        merged = sorted([*rejects, *refused], key=lambda r: r.row)
        empty = pa.RecordBatch.from_pylist([], schema=table.schema)
        return np.asarray(kept, dtype=np.int64), batch[0] if batch else empty, merged

    def _parse(self, rows: list[int], texts: list[bytes]) -> tuple[list[pa.Table], list[Reject]]:
        """Parse ``texts`` whole; when pyarrow refuses, or reads other than one row per
        record (a quote this module's cut and pyarrow read differently), halve."""
        if not texts:
            return [], []
        invalid: list[Reject] = []
        try:
            table = self._read(texts, rows, invalid)
        except (pa.ArrowException, ValueError) as exc:
            table, error = None, f"{exc}"[:200]
        else:
            error = "pyarrow read it as other than one row"
        aligned = all(r.row >= 0 for r in invalid)
        if table is not None and aligned and table.num_rows + len(invalid) == len(texts):
            return [table], invalid
        if len(texts) == 1:
            return [], [Reject(rows[0], "unparseable", error)]
        half = len(texts) // 2
        left, left_rejects = self._parse(rows[:half], texts[:half])
        right, right_rejects = self._parse(rows[half:], texts[half:])
        return left + right, left_rejects + right_rejects

    def _read(self, texts: list[bytes], rows: list[int], invalid: list[Reject]) -> pa.Table:
        def on_invalid(row: Any) -> str:
            # row.number counts records including the header (texts hold no blank ones).
            index = int(row.number or 0) - 2
            if not 0 <= index < len(rows):  # pyarrow cut differently: _parse halves
                invalid.append(Reject(-1, "unparseable", "misaligned"))
                return "skip"
            text = str(row.text)[:80]
            detail = f"{row.actual_columns} fields, header has {row.expected_columns}: {text!r}"
            invalid.append(Reject(rows[index], "unparseable", detail))
            return "skip"

        payload = b"\n".join([self._header, *texts, b""])
        return pa_csv.read_csv(
            io.BytesIO(payload),
            read_options=pa_csv.ReadOptions(
                use_threads=False, block_size=max(len(payload) + 1, 1 << 16)
            ),
            parse_options=pa_csv.ParseOptions(
                newlines_in_values=True, invalid_row_handler=on_invalid
            ),
            convert_options=self._convert,
        )

    def _empty(self) -> pa.Table:
        names = self._convert.include_columns
        return pa.table({name: pa.array([], type=pa.string()) for name in names})


# --- Parquet ------------------------------------------------------------------------------


class ParquetReader(_Reader):
    """``ParquetFile.iter_batches``; whole row groups before ``after_row`` are not read."""

    format: Format = "parquet"

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
                yield arrow_chunk(
                    batch, rows, mapping, after_row=after_row, max_cell_bytes=self._max_row_bytes
                )


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


class JsonLinesReader(_Reader):
    """One JSON object per line (keys are columns), or one JSON array per line (the values
    of a one-input model). Lines are decoded only after ``after_row``."""

    format: Format = "jsonl"

    def columns(self) -> list[str]:
        for _row, line in self._numbered_lines(0):
            if isinstance(line, TooLarge):
                continue
            try:
                record = msgspec.json.decode(line)
            except (msgspec.DecodeError, RecursionError):
                continue  # reported as a reject when read; look for a readable one
            else:
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
            record = self._decode(row, line)
            if isinstance(record, Reject):
                rejects.append(record)
            else:
                records.append(record)
                rows.append(row)
            if len(rows) + len(rejects) >= self._batch_rows:
                yield records_chunk(rows, records, mapping, rejects)
                rows, records, rejects = [], [], []
        if rows or rejects:
            yield records_chunk(rows, records, mapping, rejects)

    def _decode(self, row: int, line: bytes | TooLarge) -> Any:
        """The line's JSON value, or the :class:`Reject` saying why there is none."""
        if isinstance(line, TooLarge):
            detail = f"line of {line.size:,} bytes or more, over the {self._max_row_bytes:,} limit"
            return Reject(row, "too_large", detail)
        try:
            return msgspec.json.decode(line)
        except msgspec.DecodeError as exc:
            return Reject(row, "unparseable", f"not JSON: {exc}"[:200])
        except RecursionError:
            return Reject(row, "too_deep", "JSON nested too deep to read")

    def _numbered_lines(self, after_row: int) -> Iterator[tuple[int, bytes | TooLarge]]:
        """Non-blank lines with their row numbers; a line over the limit is read past in
        pieces and comes as :class:`TooLarge`. Lines up to ``after_row`` are only counted."""
        row = 0
        limit = self._max_row_bytes
        with _open_binary(self.path) as lines:
            while line := lines.readline(limit + 1):
                if len(line) > limit and not line.endswith(b"\n"):
                    size = len(line)
                    while (rest := lines.readline(1 << 20)) and not rest.endswith(b"\n"):
                        size += len(rest)
                    row += 1
                    if row > after_row:
                        yield row, TooLarge(size + len(rest))
                    continue
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

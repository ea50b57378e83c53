"""Values read from a file -> a :class:`Chunk`: one array per model input for the rows that
convert, a :class:`Reject` for each row that does not.

Arrow batches (CSV, Parquet) are converted a whole column at a time; only a batch holding a
value that does not convert is redone row by row, to name the rows. JSON records are
converted row by row. Both follow :mod:`backfill.mapping`'s rules.

No row can fail a chunk: before anything becomes a Python object, rows whose lists hold more
values than the input takes or whose text is over ``max_cell_bytes`` are rejected from the
Arrow buffers' offsets alone (a 611-byte Parquet file can hold a list of 5M zeros: 20 MB as
Arrow, hundreds as Python floats). Any other error converting one row rejects that row.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Final

import numpy as np
import numpy.typing as npt
import pyarrow as pa
import pyarrow.compute as pc

from backfill.mapping import (
    WHOLE_RECORD,
    Array,
    InputColumns,
    Mapping,
    RowError,
    row_to_array,
    to_dtype,
)

_MISSING: Final = object()
MAX_CELL_BYTES: Final = 1 << 20  # default bound on one value's text (a CSV record, a string)


@dataclass(frozen=True, slots=True)
class Reject:
    """A row that cannot become a request."""

    row: int
    reason: str
    detail: str


@dataclass(frozen=True, slots=True)
class Chunk:
    """Consecutive rows of a file: ``rows[i]`` is the row number of ``inputs[name][i]``."""

    rows: npt.NDArray[np.int64]
    inputs: dict[str, Array]
    rejects: list[Reject] = field(default_factory=list)


def records_chunk(
    rows: Sequence[int], records: Sequence[Any], mapping: Mapping, rejects: list[Reject]
) -> Chunk:
    """Decoded JSON records (objects, or arrays for ``WHOLE_RECORD``) -> a chunk."""
    arrays: dict[str, Array] = {}
    errors: dict[int, RowError] = {}
    for mapped in mapping:
        values = [_record_values(record, mapped) for record in records]
        arrays[mapped.spec.name], found = _per_row(values, mapped)
        for position, error in found.items():
            errors.setdefault(position, error)
    return _assemble(np.asarray(rows, dtype=np.int64), arrays, errors, rejects)


def _record_values(record: Any, mapped: InputColumns) -> Any:
    """The values ``mapped`` takes from one record, or the :class:`RowError` saying why not."""
    if mapped.columns == (WHOLE_RECORD,):
        if isinstance(record, list):
            return record
        return RowError("unparseable", "expected a JSON array, like the file's first record")
    if not isinstance(record, dict):
        return RowError("unparseable", "expected a JSON object, like the file's first record")
    values = [record.get(column, _MISSING) for column in mapped.columns]
    for column, value in zip(mapped.columns, values, strict=True):
        if value is _MISSING:
            return RowError("missing_column", f"no {column!r} in this record")
    return values[0] if mapped.packed else values


# --- Arrow batches -> chunks ----------------------------------------------------------------


def arrow_chunk(
    batch: pa.RecordBatch,
    rows: npt.NDArray[np.int64],
    mapping: Mapping,
    *,
    rejects: Sequence[Reject] = (),
    after_row: int = 0,
    max_cell_bytes: int = MAX_CELL_BYTES,
) -> Chunk:
    """Convert ``batch`` (whose rows are numbered ``rows``); rows up to ``after_row`` are
    dropped before any conversion work, oversized rows (see the module docstring) before
    any value becomes a Python object."""
    rejects = [r for r in rejects if r.row > after_row]
    start = int(np.searchsorted(rows, after_row, side="right"))
    if start:
        batch, rows = batch.slice(start), rows[start:]
    oversized = _oversized(batch, mapping, max_cell_bytes)
    if oversized:
        keep = np.ones(len(rows), dtype=bool)
        keep[list(oversized)] = False
        too_big = [Reject(int(rows[p]), e.reason, str(e)) for p, e in oversized.items()]
        rejects = sorted([*rejects, *too_big], key=lambda r: r.row)
        batch, rows = batch.filter(pa.array(keep)), rows[keep]
    arrays: dict[str, Array] = {}
    errors: dict[int, RowError] = {}
    for mapped in mapping:
        array = _arrow_input(batch, mapped)
        if array is None:  # some value needs a closer look: go row by row
            array, found = _per_row(_arrow_values(batch, mapped), mapped)
            for position, error in found.items():
                errors.setdefault(position, error)
        arrays[mapped.spec.name] = array
    return _assemble(rows, arrays, errors, rejects)


def _arrow_input(batch: pa.RecordBatch, mapped: InputColumns) -> Array | None:
    """The whole batch's values for ``mapped`` in one vectorised step, or None when some
    value is missing, not a number or of the wrong length."""
    target = pa.int64() if np.dtype(mapped.spec.dtype).kind in "iu" else pa.float64()
    count = batch.num_rows
    if mapped.packed:
        column = batch.column(mapped.columns[0])
        values = _list_values(column, mapped.size) if _is_list(column.type) else None
        if values is None and mapped.size == 1 and not _is_list(column.type):
            values = column
        numbers = None if values is None else _cast(values, target)
    else:
        parts = [_cast(batch.column(name), target) for name in mapped.columns]
        present = [p for p in parts if p is not None]
        numbers = np.column_stack(present) if len(present) == len(parts) else None
    if numbers is None:
        return None
    try:
        return to_dtype(numbers.reshape((count, *mapped.spec.shape)), mapped.spec)
    except RowError:
        return None


def _oversized(batch: pa.RecordBatch, mapping: Mapping, max_cell_bytes: int) -> dict[int, RowError]:
    """Rows (by position) holding a list with more values than the input takes, or a text
    or binary value over ``max_cell_bytes``: measured on offsets, nothing is converted."""
    found: dict[int, RowError] = {}
    for mapped in mapping:
        allowed = mapped.size if mapped.packed else 1
        for name in mapped.columns:
            column = batch.column(name)
            counts = _leaf_counts(column)
            if counts is not None:
                for position in np.flatnonzero(counts > allowed).tolist():
                    found.setdefault(
                        position,
                        RowError(
                            "wrong_length",
                            f"input {mapped.spec.name!r} takes {mapped.size} values, column "
                            f"{name!r} holds {int(counts[position])}",
                        ),
                    )
            elif _is_text(column.type):
                sizes = pc.binary_length(column).to_numpy(zero_copy_only=False)
                big = np.flatnonzero(np.nan_to_num(sizes.astype(np.float64)) > max_cell_bytes)
                for position in big.tolist():
                    found.setdefault(
                        position,
                        RowError(
                            "too_large",
                            f"column {name!r}: {int(sizes[position]):,} bytes, over the "
                            f"{max_cell_bytes:,} a value may take",
                        ),
                    )
    return found


def _leaf_counts(column: pa.Array) -> npt.NDArray[np.int64] | None:
    """Per row, how many values its (possibly nested) lists hold in all; None for a column
    that is not a list. Walks the offsets level by level: ``[starts, ends)`` is each row's
    range in the current level's array."""
    if not _is_list(column.type):
        return None
    starts = np.arange(len(column), dtype=np.int64)
    ends = starts + 1
    level: pa.Array = column
    while _is_list(level.type):
        if pa.types.is_fixed_size_list(level.type):
            size, shift = level.type.list_size, level.offset  # .values ignores the slice
            starts, ends = (starts + shift) * size, (ends + shift) * size
        else:
            offsets = level.offsets.to_numpy(zero_copy_only=False).astype(np.int64)
            starts, ends = offsets[starts], offsets[ends]
        level = level.values
    return ends - starts


def _is_text(type_: pa.DataType) -> bool:
    return bool(
        pa.types.is_string(type_)
        or pa.types.is_large_string(type_)
        or pa.types.is_binary(type_)
        or pa.types.is_large_binary(type_)
    )


def _is_list(type_: pa.DataType) -> bool:
    return bool(
        pa.types.is_list(type_)
        or pa.types.is_large_list(type_)
        or pa.types.is_fixed_size_list(type_)
    )


def _list_values(column: pa.Array, size: int) -> pa.Array | None:
    if column.null_count or _is_list(column.type.value_type):
        return None
    lengths = pc.list_value_length(column).to_numpy(zero_copy_only=False)
    if len(lengths) and not (lengths == size).all():
        return None
    return column.flatten()


def _cast(values: pa.Array, target: pa.DataType) -> npt.NDArray[Any] | None:
    if values.null_count:
        return None
    try:
        numbers: npt.NDArray[Any] = pc.cast(values, target).to_numpy(zero_copy_only=False)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError):
        return None
    return numbers


def _arrow_values(batch: pa.RecordBatch, mapped: InputColumns) -> list[Any]:
    if mapped.packed:
        return list(batch.column(mapped.columns[0]).to_pylist())
    return list(zip(*(batch.column(name).to_pylist() for name in mapped.columns), strict=True))


def _per_row(values: Sequence[Any], mapped: InputColumns) -> tuple[Array, dict[int, RowError]]:
    """Row-by-row conversion: the array (zeros where a row failed) and the failures."""
    out = np.zeros((len(values), *mapped.spec.shape), dtype=mapped.spec.dtype)
    errors: dict[int, RowError] = {}
    for position, value in enumerate(values):
        if isinstance(value, RowError):
            errors[position] = value
            continue
        try:
            out[position] = row_to_array(value, mapped)
        except RowError as exc:
            errors[position] = exc
        except Exception as exc:  # whatever else one row's values do, it is that row's reject
            errors[position] = RowError("unconvertible", f"{type(exc).__name__}: {exc}"[:200])
    return out, errors


def _assemble(
    rows: npt.NDArray[np.int64],
    arrays: dict[str, Array],
    errors: dict[int, RowError],
    rejects: Sequence[Reject],
) -> Chunk:
    if not errors:
        return Chunk(rows=rows, inputs=arrays, rejects=list(rejects))
    keep = np.ones(len(rows), dtype=bool)
    keep[list(errors)] = False
    found = [Reject(int(rows[p]), e.reason, str(e)) for p, e in errors.items()]
    return Chunk(
        rows=rows[keep],
        inputs={name: array[keep] for name, array in arrays.items()},
        rejects=sorted([*rejects, *found], key=lambda r: r.row),
    )


def empty_inputs(mapping: Mapping) -> dict[str, Array]:
    return {m.spec.name: np.empty((0, *m.spec.shape), dtype=m.spec.dtype) for m in mapping}

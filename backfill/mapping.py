"""Which file columns feed which model input, and turning their values into arrays.

Rules (per model input ``I`` of per-example shape ``S`` holding ``k = prod(S)`` values), first
match wins:

1. ``--columns`` given: ``I=COL[,COL...]`` per input, or -- for a one-input model -- just the
   column names. A name may be a glob (``'px_*'``), expanded in file column order. One column
   holds the whole example (a list of ``k`` values, nested or flat; a JSON array string in
   CSV; a plain number when ``k == 1``); ``k`` columns hold one value each, in the order given.
2. A column named ``I`` holds the whole example.
3. Columns ``I_0 .. I_{k-1}`` hold one value each.
4. A one-input model only: a file with exactly ``k`` columns uses them in file order (digits:
   64 numeric columns); a file with exactly one column holds the whole example.

Anything else is a :class:`MappingError` naming the file's columns, raised before a single
row is sent. Values must be numbers (numeric strings such as CSV's are parsed; booleans count
as 1/0). A value that is missing, not a number, a list of the wrong length, or not integral
for an integer input makes that row a reject (:class:`RowError`), reported with its row number.
NaN, infinity and out-of-range values are *not* rejects: they make valid requests that the
validate stage dead-letters, as it would for any client. An integer too large for a float
(JSON's ``1`` followed by 400 zeros), a list nested deeper than :data:`MAX_DEPTH` or holding
more values than the input takes are rejects, found without building more than the input's
values.
"""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Final

import msgspec
import numpy as np
import numpy.typing as npt

from schemas.models import ModelSpec, TensorSpec

WHOLE_RECORD: Final = "$"  # JSON lines whose record is a bare array: the array is the column
MAX_DEPTH: Final = 64  # numpy's own limit on dimensions; deeper lists are never an example
Array = npt.NDArray[Any]


class MappingError(ValueError):
    """The file's columns cannot be mapped onto the model's inputs."""


class RowError(ValueError):
    """One row cannot become a request; ``reason`` is a short code, ``str()`` the detail."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason


@dataclass(frozen=True, slots=True)
class InputColumns:
    """Where one model input's values come from."""

    spec: TensorSpec
    columns: tuple[str, ...]

    @property
    def size(self) -> int:
        return math.prod(self.spec.shape)

    @property
    def packed(self) -> bool:
        """One column holds the whole example (else one column per value)."""
        return len(self.columns) == 1


Mapping = tuple[InputColumns, ...]
ColumnsOption = dict[str | None, list[str]]  # input name (None: the only input) -> patterns


def parse_columns_option(tokens: Sequence[str] | None) -> ColumnsOption | None:
    """``--columns`` tokens -> patterns per input; commas separate names within a token."""
    if not tokens:
        return None
    option: ColumnsOption = {}
    named = any("=" in token for token in tokens)
    for token in tokens:
        if named and "=" not in token:
            raise MappingError(f"--columns {token!r}: use INPUT=COL[,COL...] for every input")
        name, _, names = token.partition("=") if named else (None, "", token)
        option.setdefault(name, []).extend(n for n in names.split(",") if n)
    return option


def plan_mapping(spec: ModelSpec, columns: Sequence[str], option: ColumnsOption | None) -> Mapping:
    """Apply the module's rules to a file with ``columns`` (in file order)."""
    if option is not None:
        return _from_option(spec, columns, option)
    return tuple(_by_rule(spec, item, columns) for item in spec.inputs)


def _from_option(spec: ModelSpec, columns: Sequence[str], option: ColumnsOption) -> Mapping:
    if None in option:
        if len(spec.inputs) != 1:
            names = [i.name for i in spec.inputs]
            raise MappingError(f"model {spec.name!r} has inputs {names}: use --columns INPUT=COLS")
        option = {spec.inputs[0].name: option[None]}
    unknown = sorted(str(n) for n in set(option) - {i.name for i in spec.inputs})
    if unknown:
        raise MappingError(f"--columns names {unknown}, not inputs of model {spec.name!r}")
    mapping = []
    for item in spec.inputs:
        if item.name not in option:
            mapping.append(_by_rule(spec, item, columns))
            continue
        chosen = tuple(_expand(option[item.name], columns))
        mapping.append(_checked(InputColumns(item, chosen)))
    return tuple(mapping)


def _expand(patterns: Iterable[str], columns: Sequence[str]) -> Iterator[str]:
    for pattern in patterns:
        matches = [c for c in columns if fnmatch.fnmatchcase(c, pattern)]
        if not matches:
            raise MappingError(f"--columns {pattern!r} matches no column of {list(columns)[:20]}")
        yield from matches


def _checked(mapped: InputColumns) -> InputColumns:
    if not mapped.packed and len(mapped.columns) != mapped.size:
        raise MappingError(
            f"input {mapped.spec.name!r} takes {mapped.size} values: one column holding them "
            f"all, or {mapped.size} columns; got {len(mapped.columns)} columns"
        )
    return mapped


def _by_rule(spec: ModelSpec, item: TensorSpec, columns: Sequence[str]) -> InputColumns:
    size = math.prod(item.shape)
    if item.name in columns:
        return InputColumns(item, (item.name,))
    indexed = tuple(f"{item.name}_{i}" for i in range(size))
    if all(c in columns for c in indexed):
        return InputColumns(item, indexed)
    if len(spec.inputs) == 1 and len(columns) in (1, size):
        return InputColumns(item, tuple(columns))
    raise MappingError(
        f"cannot map the file's {len(columns)} columns ({_preview(columns)}) onto input "
        f"{item.name!r} ({size} values): expected a column {item.name!r}, columns "
        f"{item.name}_0..{item.name}_{size - 1}, or (one-input model) exactly {size} columns "
        "or one; say which with --columns"
    )


def _preview(columns: Sequence[str]) -> str:
    if len(columns) <= 8:
        return ", ".join(map(repr, columns))
    return ", ".join([*map(repr, columns[:4]), "...", *map(repr, columns[-3:])])


# --- values -> arrays ---------------------------------------------------------------------


def row_to_array(values: Any, mapped: InputColumns) -> Array:
    """One row's values for ``mapped`` (the packed column's value, or a sequence of one value
    per column) as an array of the input's dtype and shape; :class:`RowError` otherwise."""
    leaves = _packed_leaves(values, mapped) if mapped.packed else list(values)
    numbers = _numbers(leaves, mapped)
    if numbers.size != mapped.size:
        raise RowError(
            "wrong_length",
            f"input {mapped.spec.name!r} takes {mapped.size} values, column "
            f"{mapped.columns[0]!r} holds {numbers.size}",
        )
    return to_dtype(numbers, mapped.spec).reshape(mapped.spec.shape)


def _packed_leaves(value: Any, mapped: InputColumns) -> list[Any]:
    column = mapped.columns[0]
    if isinstance(value, str | bytes) and mapped.size != 1:
        try:
            value = msgspec.json.decode(value)
        except RecursionError:
            raise RowError("too_deep", f"column {column!r}: JSON nested too deep") from None
        except msgspec.DecodeError:
            raise RowError(
                "not_a_number", f"column {column!r}: {str(value)[:60]!r} is not a JSON array"
            ) from None
    if value is None:
        raise RowError("missing_value", f"column {column!r} is empty")
    if isinstance(value, list | tuple):
        if len(value) == mapped.size and not isinstance(value[0], list | tuple):
            return list(value)  # flat, the usual case; _numbers checks every value
        return _flatten(value, mapped)
    return [value]


def _flatten(values: list[Any] | tuple[Any, ...], mapped: InputColumns) -> list[Any]:
    """The leaves of nested lists, in order. Iterative (no recursion limit to hit) and it
    stops as soon as there are more leaves than the input takes or the nesting is deeper
    than any tensor."""
    leaves: list[Any] = []
    size = mapped.size
    stack = [iter(values)]
    while stack:
        for value in stack[-1]:
            if isinstance(value, list | tuple):
                if len(stack) >= MAX_DEPTH:
                    where = mapped.columns[0]
                    raise RowError("too_deep", f"column {where!r} nests over {MAX_DEPTH} deep")
                stack.append(iter(value))
                break
            leaves.append(value)
            if len(leaves) > size:
                raise RowError(
                    "wrong_length",
                    f"input {mapped.spec.name!r} takes {mapped.size} values, column "
                    f"{mapped.columns[0]!r} holds more",  # counting stopped there: no huge lists
                )
        else:
            stack.pop()
    return leaves


def _numbers(leaves: list[Any], mapped: InputColumns) -> npt.NDArray[np.float64]:
    """Fast path through numpy; on failure or NaN (None also becomes NaN) find the culprit."""
    try:
        numbers = np.asarray(leaves, dtype=np.float64)
    except (ValueError, TypeError, OverflowError):  # Overflow: a Python int beyond float64
        return _numbers_slowly(leaves, mapped)
    if numbers.ndim != 1 or np.isnan(numbers).any():
        return _numbers_slowly(leaves, mapped)
    return numbers


def _numbers_slowly(leaves: list[Any], mapped: InputColumns) -> npt.NDArray[np.float64]:
    out = np.empty(len(leaves), dtype=np.float64)
    for i, value in enumerate(leaves):
        where = mapped.columns[0] if mapped.packed else mapped.columns[i]
        out[i] = _number(value, f"column {where!r}" + (f" item {i}" if mapped.packed else ""))
    return out


def _number(value: Any, where: str) -> float:
    if value is None or value == "":
        raise RowError("missing_value", f"{where} is empty")
    if isinstance(value, bool | int | float):
        try:
            return float(value)
        except OverflowError:  # an exact integer (JSON) too large for any float
            # (not str(value): Python refuses to print an int of over 4,300 digits)
            bits = int(value).bit_length()
            detail = f"{where}: a {bits}-bit integer, beyond float64"
            raise RowError("out_of_range", detail) from None
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            pass
    raise RowError("not_a_number", f"{where}: {str(value)[:60]!r} is not a number")


def to_dtype(numbers: npt.NDArray[Any], spec: TensorSpec) -> Array:
    """``numbers`` as the input's dtype; integers must be whole and fit."""
    dtype = np.dtype(spec.dtype)
    if dtype.kind not in "iub":
        return numbers.astype(dtype)
    if dtype.kind == "b":
        if not np.isin(numbers, (0, 1)).all():
            raise RowError("not_an_integer", f"input {spec.name!r} takes booleans (0 or 1)")
        return numbers.astype(dtype)
    info = np.iinfo(dtype)
    whole = np.isfinite(numbers).all() and bool((numbers == np.round(numbers)).all())
    if not whole or numbers.min(initial=0) < info.min or numbers.max(initial=0) > info.max:
        raise RowError("not_an_integer", f"input {spec.name!r} takes whole {dtype.name} values")
    return numbers.astype(dtype)

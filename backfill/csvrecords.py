"""A CSV file cut into records, with a bound on a record's size, before pyarrow parses them.

pyarrow's streaming CSV reader stops for good at a record larger than its block size
("straddling object"), so one oversized cell would end a backfill. Here the file is read in
blocks and cut at line ends that are outside quoted values; a record over ``max_bytes`` is
skipped as it streams past (never held whole) and reported as a :class:`TooLarge`.

Quoting follows RFC 4180 as pyarrow and Python's ``csv`` read it: a quote opens a quoted value
only at the start of a field, ``""`` inside one is a quote, and a line end inside one is part
of the value. ``\\n``, ``\\r\\n`` and ``\\r`` all end a line; blank lines are not records.
Where this cut disagrees with pyarrow on a malformed line, the parser's per-record fallback
in :mod:`backfill.readers` rejects that record alone.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Final, Protocol

import numpy as np

_QUOTE: Final = ord('"')
_FIELD_START: Final = frozenset(b",\n\r")  # bytes after which a quote opens a quoted value
_LINE_END: Final = frozenset(b"\n\r")


@dataclass(frozen=True, slots=True)
class TooLarge:
    """A record that was not kept: ``size`` bytes (at least) without its line end."""

    size: int


Record = bytes | TooLarge


class ByteStream(Protocol):
    def read(self, size: int = -1, /) -> bytes: ...


class RecordCutter:
    """Cuts a byte stream into CSV records (without their line ends), in file order."""

    def __init__(self, data: ByteStream, *, max_bytes: int, read_bytes: int = 1 << 20) -> None:
        self._data = data
        self._max = max_bytes
        self._read = read_bytes
        self._in_quotes = False
        self._quote_pending = False  # a quote ended the last block inside a quoted value
        self._prev = ord("\n")  # the byte before the current block (a file starts a field)
        self._parts: list[bytes] = []  # the record so far, when not oversized
        self._size = 0
        self._oversized = False

    def records(self) -> Iterator[Record]:
        """Every non-blank record; the first is the header."""
        while block := self._data.read(self._read):
            yield from self._block(block)
        self._quote_pending = False
        if self._size:  # the last record had no line end
            yield self._finish()

    def _block(self, block: bytes) -> Iterator[Record]:
        start = 0
        for end in self._line_ends(block):
            self._add(block[start:end])
            if self._size or self._oversized:
                yield self._finish()
            start = end + 1
        self._add(block[start:])
        self._prev = block[-1]

    def _add(self, piece: bytes) -> None:
        self._size += len(piece)
        if self._oversized:
            return
        if self._size > self._max:
            self._oversized, self._parts = True, []
        elif piece:
            self._parts.append(piece)

    def _finish(self) -> Record:
        record: Record = TooLarge(self._size) if self._oversized else b"".join(self._parts)
        self._parts, self._size, self._oversized = [], 0, False
        return record

    def _line_ends(self, block: bytes) -> list[int]:
        """Positions in ``block`` of the line ends that end records."""
        arr = np.frombuffer(block, dtype=np.uint8)
        quotes = arr == _QUOTE
        if not (self._in_quotes or self._quote_pending or quotes.any()):
            ends: list[int] = np.flatnonzero((arr == 10) | (arr == 13)).tolist()
            return ends
        special = np.flatnonzero(quotes | (arr == 10) | (arr == 13)).tolist()
        return self._scan(block, special)

    def _scan(self, block: bytes, special: list[int]) -> list[int]:
        """The quoting state machine, stepping over quotes and line ends only."""
        ends: list[int] = []
        skip = -1  # the second quote of a ``""`` pair
        if self._quote_pending:
            self._quote_pending = False
            if block[0] == _QUOTE:
                skip = 0
            else:
                self._in_quotes = False
        last = len(block) - 1
        for p in special:
            if p == skip:
                continue
            byte = block[p]
            if byte != _QUOTE:
                if not self._in_quotes:
                    ends.append(p)
            elif not self._in_quotes:
                before = block[p - 1] if p else self._prev
                self._in_quotes = before in _FIELD_START
            elif p == last:
                self._quote_pending = True
            elif block[p + 1] == _QUOTE:
                skip = p + 1
            else:
                self._in_quotes = False
        return ends

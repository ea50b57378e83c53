"""Completeness of a backfill's results, against its checkpoint.

Every row of a source's done prefix was rejected (the rejects report), or acknowledged by
Kafka and so must end up as a result or a dead letter. :class:`SourceTally` keeps, per
source, one flag per row of the prefix for "has a result" and "is in the DLQ" (a byte per
row, not a set of ids); results and dead letters are matched to rows by their ``file`` and
``row`` attributes, checked against the id those imply.

The topics are written by others too, and the attributes the pipeline sets (``source``,
``backfill_id``, ``file``, ``row``, ``original_id``) are data as far as a reader knows. So a
record counts for a backfill only when its ``backfill_id`` is the backfill's, its ``file`` is
one of the checkpoint's sources, its ``row`` a plain ASCII number within that source's range
and its id the one those imply; anything else is *foreign*: counted, never written.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final, Literal

import numpy as np
import numpy.typing as npt

from backfill.checkpoint import Checkpoint, SourceState
from backfill.ids import replay_request_id, request_id
from kafkaio import dead_letters

_DETAILS_KEPT: Final = 10_000  # dead-letter details kept for listing (counts are exact)
_MAX_ROW_DIGITS: Final = 19  # a row or offset fits in an int64
Admission = Literal["new", "duplicate", "foreign"]


def plain_row(value: object) -> int | None:
    """``value`` as a row number when it is a string of 1-19 ASCII digits, else None.
    (``str.isdigit`` is not enough: it accepts ``"²"``, which ``int`` refuses.)"""
    if not isinstance(value, str) or not 0 < len(value) <= _MAX_ROW_DIGITS:
        return None
    return int(value) if value.isascii() and value.isdigit() else None


@dataclass
class SourceTally:
    """Per source of the checkpoint: which rows of its done prefix have a result or a dead
    letter. Index ``i`` is row ``first_row + i``."""

    state: SourceState
    backfill_id: str
    rejected: npt.NDArray[np.bool_]
    present: npt.NDArray[np.bool_]
    dead: npt.NDArray[np.bool_]

    @classmethod
    def of(cls, state: SourceState, backfill_id: str, rejected_rows: Iterable[int]) -> SourceTally:
        size = max(state.last_row - state.first_row + 1, 0)
        rejected = np.zeros(size, dtype=bool)
        for row in rejected_rows:
            if state.first_row <= row <= state.last_row:
                rejected[row - state.first_row] = True
        return cls(state, backfill_id, rejected, np.zeros(size, bool), np.zeros(size, bool))

    def owns(self, row: int, record_id: str, original_id: str | None) -> bool:
        """Whether a record naming ``row`` of this source is that row's request: the row is
        in the source's range (after the done prefix only while the run is unfinished) and
        the id is the one the row implies."""
        state = self.state
        if row < state.first_row or (state.end_row is not None and row >= state.end_row):
            return False
        if state.complete and row > state.last_row:
            return False
        if state.kind == "file":
            return record_id == request_id(self.backfill_id, state.key, row)
        return record_id == replay_request_id(self.backfill_id, original_id or "")

    def index(self, row: int) -> int | None:
        """Where ``row`` counts, or None when it is after the done prefix."""
        index = row - self.state.first_row
        return index if index < len(self.present) else None

    @property
    def expected(self) -> int:
        return self.state.sent

    def missing_rows(self) -> npt.NDArray[np.int64]:
        """Rows sent but neither present nor dead-lettered (files only: for a replay's
        partition, skipped offsets are not known row by row)."""
        if self.state.kind != "file":
            return np.empty(0, dtype=np.int64)
        gone = ~(self.rejected | self.present | self.dead)
        return np.flatnonzero(gone).astype(np.int64) + self.state.first_row


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """What the DLQ says about one of the backfill's requests."""

    source: str
    row: int | None
    reason: str
    error: str


@dataclass
class ExportTally:
    """Everything seen while reading; :func:`report_for` turns it into the completeness
    check."""

    backfill_id: str
    sources: dict[str, SourceTally]
    rejected: int
    written: int = 0
    duplicates: int = 0
    foreign: int = 0  # records naming this backfill that are none of its rows: ignored
    beyond_checkpoint: set[str] = field(default_factory=set)
    dead_reasons: Counter[str] = field(default_factory=Counter)
    dead_details: dict[str, DeadLetter] = field(default_factory=dict)
    _dead_ids: set[str] = field(default_factory=set)

    def accounted(self) -> int:
        return sum(int((t.present | t.dead).sum()) for t in self.sources.values())

    def expected(self) -> int:
        return sum(t.expected for t in self.sources.values())

    def complete(self) -> bool:
        return self.accounted() >= self.expected()

    def admit(self, record_id: str, attributes: dict[str, str]) -> Admission:
        """Mark a result seen: ``new`` (write it), ``duplicate`` (its id was written) or
        ``foreign`` (not one of this backfill's rows, see the module docstring)."""
        tally, index = self._locate(record_id, attributes)
        if tally is None:
            self.foreign += 1
            return "foreign"
        if index is None:  # an unfinished run's row after its checkpoint
            if record_id in self.beyond_checkpoint:
                return "duplicate"
            self.beyond_checkpoint.add(record_id)
            return "new"
        if tally.present[index]:
            return "duplicate"
        tally.present[index] = True
        return "new"

    def dead_letter(
        self, record_id: str, attributes: dict[str, str], letter: dead_letters.DeadLetter
    ) -> None:
        tally, index = self._locate(record_id, attributes)
        if tally is None:
            self.foreign += 1
            return
        if record_id in self._dead_ids:
            return
        self._dead_ids.add(record_id)
        if index is not None:
            tally.dead[index] = True
        reason = letter.reason
        self.dead_reasons[reason] += 1
        if len(self.dead_details) < _DETAILS_KEPT:
            self.dead_details[record_id] = DeadLetter(
                source=attributes.get("file", "?"),
                row=plain_row(attributes.get("row")),
                reason=reason,
                error=letter.error[:200],
            )

    def _locate(
        self, record_id: str, attributes: dict[str, str]
    ) -> tuple[SourceTally | None, int | None]:
        """The source a record is a row of and its index in the done prefix (None: after
        it); no source for a foreign record."""
        if attributes.get("backfill_id") != self.backfill_id:
            return None, None
        file = attributes.get("file")
        tally = self.sources.get(file) if isinstance(file, str) else None
        row = plain_row(attributes.get("row"))
        original_id = attributes.get("original_id")
        if tally is None or row is None:
            return None, None
        if not tally.owns(row, record_id, original_id if isinstance(original_id, str) else None):
            return None, None
        return tally, tally.index(row)


@dataclass
class ExportReport:
    """The completeness check, as printed by ``streaminfer export``."""

    backfill_id: str
    path: Path
    written: int
    expected: int
    present: int
    dead_lettered: int
    missing: int
    rejected: int
    duplicates: int
    beyond_checkpoint: int
    checkpoint_complete: bool
    dead_reasons: dict[str, int]
    listed: list[str]
    foreign: int = 0

    @property
    def complete(self) -> bool:
        return self.missing == 0

    def lines(self) -> list[str]:
        reasons = ", ".join(f"{r} {n:,}" for r, n in sorted(self.dead_reasons.items()))
        lines = [
            f"export {self.backfill_id} -> {self.path}: {self.written:,} rows",
            f"  expected       {self.expected:,} (rows Kafka acknowledged, per the checkpoint)",
            f"  present        {self.present:,}",
            f"  dead-lettered  {self.dead_lettered:,}" + (f" ({reasons})" if reasons else ""),
            f"  missing        {self.missing:,}" + ("" if self.missing else " - complete"),
            f"  rejected       {self.rejected:,} rows never sent (see the rejects report)",
            f"  duplicates     {self.duplicates:,} repeated result ids on the topic, exported once",
        ]
        if self.beyond_checkpoint:
            lines.append(
                f"  unplanned      {self.beyond_checkpoint:,} results for rows after the "
                "checkpoint (an unfinished run; exported too)"
            )
        if self.foreign:
            lines.append(
                f"  ignored        {self.foreign:,} records naming this backfill that are none "
                "of its rows (not exported)"
            )
        if not self.checkpoint_complete:
            lines.append("  note           the backfill has not finished: resume it for the rest")
        return lines + [f"  {line}" for line in self.listed]


def report_for(checkpoint: Checkpoint, tally: ExportTally, path: Path, show: int) -> ExportReport:
    sources = tally.sources.values()
    present = sum(int(t.present.sum()) for t in sources)
    dead = sum(int((t.dead & ~t.present).sum()) for t in sources)
    expected = tally.expected()
    listed = _listing(tally, show)
    return ExportReport(
        backfill_id=tally.backfill_id,
        path=path,
        written=tally.written,
        expected=expected,
        present=present,
        dead_lettered=dead,
        missing=max(expected - present - dead, 0),
        rejected=tally.rejected,
        duplicates=tally.duplicates,
        beyond_checkpoint=len(tally.beyond_checkpoint),
        foreign=tally.foreign,
        checkpoint_complete=checkpoint.complete,
        dead_reasons=dict(tally.dead_reasons),
        listed=listed,
    )


def _listing(tally: ExportTally, show: int) -> list[str]:
    """Up to ``show`` dead-lettered rows and ``show`` missing rows, by file and row."""
    dead = [
        f"dead-lettered {d.source} row {d.row}: {d.reason} ({d.error})"
        for d in list(tally.dead_details.values())[:show]
    ]
    missing = [
        f"missing {name} row {row}"
        for name, t in tally.sources.items()
        for row in t.missing_rows()[:show].tolist()
    ][:show]
    return dead + missing

"""Completeness of a backfill's results, against its checkpoint.

Every row of a source's done prefix was rejected (the rejects report), or acknowledged by
Kafka and so must end up as a result or a dead letter. :class:`SourceTally` keeps, per
source, one flag per row of the prefix for "has a result" and "is in the DLQ" (a byte per
row, not a set of ids); results and dead letters are matched to rows by their ``file`` and
``row`` attributes, checked against the id those imply.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

import numpy as np
import numpy.typing as npt
from confluent_kafka import Message

from backfill.checkpoint import Checkpoint, SourceState
from backfill.ids import replay_request_id, request_id
from schemas import Headers

_DETAILS_KEPT: Final = 10_000  # dead-letter details kept for listing (counts are exact)


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

    def index(self, row: int | None, record_id: str, original_id: str | None) -> int | None:
        """Where a record with these attributes counts, or None when it is not one of the
        prefix's requests (e.g. sent after the last checkpoint of an unfinished run)."""
        if row is None or not self.state.first_row <= row <= self.state.last_row:
            return None
        if self.state.kind == "file":
            expected = request_id(self.backfill_id, self.state.key, row)
        else:
            expected = replay_request_id(self.backfill_id, original_id or "")
        return row - self.state.first_row if record_id == expected else None

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

    def first_time(self, record_id: str, attributes: dict[str, str]) -> bool:
        """Mark a result seen; False when its id was already written."""
        tally, index = self._locate(record_id, attributes)
        if tally is None or index is None:
            if record_id in self.beyond_checkpoint:
                return False
            self.beyond_checkpoint.add(record_id)
            return True
        if tally.present[index]:
            return False
        tally.present[index] = True
        return True

    def dead_letter(self, record_id: str, attributes: dict[str, str], message: Message) -> None:
        if record_id in self._dead_ids:
            return
        self._dead_ids.add(record_id)
        tally, index = self._locate(record_id, attributes)
        if tally is not None and index is not None:
            tally.dead[index] = True
        raw = message.headers() or []
        headers = dict(raw.items() if isinstance(raw, dict) else raw)
        reason = _text(headers.get(Headers.DLQ_REASON)) or "unknown"
        self.dead_reasons[reason] += 1
        if len(self.dead_details) < _DETAILS_KEPT:
            row = attributes.get("row", "")
            self.dead_details[record_id] = DeadLetter(
                source=attributes.get("file", "?"),
                row=int(row) if row.isdigit() else None,
                reason=reason,
                error=_text(headers.get(Headers.DLQ_ERROR))[:200],
            )

    def _locate(
        self, record_id: str, attributes: dict[str, str]
    ) -> tuple[SourceTally | None, int | None]:
        tally = self.sources.get(attributes.get("file", ""))
        if tally is None:
            return None, None
        row = attributes.get("row", "")
        number = int(row) if row.isdigit() else None
        return tally, tally.index(number, record_id, attributes.get("original_id"))


def _text(value: str | bytes | None) -> str:
    if value is None:
        return ""
    return value.decode(errors="replace") if isinstance(value, bytes) else value


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

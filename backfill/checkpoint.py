"""What a backfill has done, on disk: ``<dir>/<id>.json`` and ``<dir>/<id>.rejects.jsonl``.

The checkpoint records, per source (a file, or a partition for a replay), the longest prefix
of rows that is *done*: acknowledged by Kafka, or rejected (reported in the rejects file), or
skipped. Kafka's delivery reports may arrive out of order, so :class:`PrefixTracker` only
advances over a contiguous run of done rows; a row after a gap waits for the gap.

Consistency: the rejects file is flushed and fsynced before the checkpoint that counts its
lines is written, and the checkpoint is replaced atomically (write a temporary file, fsync,
rename over the old one). A crash at any moment leaves the previous or the new checkpoint,
never a torn one. On ``--resume`` every row after the prefix is read again; rows that Kafka
had acknowledged after the last checkpoint are then sent a second time with the same id (the
export keeps one result per id), and reject lines may repeat (readers de-duplicate them).
"""

from __future__ import annotations

import contextlib
import os
from collections import deque
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Final, Literal

import msgspec

SourceKind = Literal["file", "partition"]
ItemKind = Literal["sent", "rejected", "skipped"]
_VERSION: Final = 1


class SourceState(msgspec.Struct, kw_only=True):
    """One source's progress. Rows of a file are 1, 2, ...; of a partition, its offsets."""

    name: str  # resolved file path, or kafka:<topic>:<partition>
    kind: SourceKind
    key: str  # file key (part of request ids); the partition number for a replay
    format: str
    fingerprint: str  # a file's size, mtime and head hash; a partition's offset window
    first_row: int = 1
    end_row: int | None = None  # exclusive end, when known up front (a replay's window)
    last_row: int = 0  # every row in [first_row, last_row] is done
    rows_done: int = 0
    sent: int = 0  # rows of the prefix acknowledged by Kafka
    rejected: int = 0  # rows of the prefix that could not become requests
    skipped: int = 0  # rows of the prefix deliberately not sent (a replay's other models)
    complete: bool = False
    estimated_rows: int | None = None

    def resume_after(self) -> int:
        """Rows up to this number are done; reading continues after it."""
        return max(self.last_row, self.first_row - 1)


class Checkpoint(msgspec.Struct, kw_only=True):
    """A whole backfill: what was asked for, and every source's progress."""

    backfill_id: str
    kind: Literal["files", "replay"]
    model: str
    model_version: str | None = None
    columns: list[str] | None = None
    created_at: float
    updated_at: float
    sources: list[SourceState]
    replay_topic: str | None = None
    replay_from_ms: int | None = None
    replay_to_ms: int | None = None
    version: int = _VERSION

    @property
    def sent(self) -> int:
        return sum(s.sent for s in self.sources)

    @property
    def rejected(self) -> int:
        return sum(s.rejected for s in self.sources)

    @property
    def complete(self) -> bool:
        return all(s.complete for s in self.sources)


class CheckpointStore:
    """Reads and atomically writes checkpoints under ``directory``."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    def path(self, backfill_id: str) -> Path:
        return self.directory / f"{backfill_id}.json"

    def rejects_path(self, backfill_id: str) -> Path:
        return self.directory / f"{backfill_id}.rejects.jsonl"

    def exists(self, backfill_id: str) -> bool:
        return self.path(backfill_id).exists()

    def load(self, backfill_id: str) -> Checkpoint:
        """The stored checkpoint; ``FileNotFoundError`` when there is none."""
        return msgspec.json.decode(self.path(backfill_id).read_bytes(), type=Checkpoint)

    def save(self, checkpoint: Checkpoint) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        write_atomically(
            self.path(checkpoint.backfill_id),
            msgspec.json.format(msgspec.json.encode(checkpoint), indent=1),
        )


def write_atomically(path: Path, data: bytes) -> None:
    """Replace ``path`` with ``data`` so that readers see the old or the new bytes, never a
    mix, even across a crash: temporary file in the same directory, fsync, rename, fsync
    the directory (so the rename itself is durable)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with tmp.open("wb") as out:
            out.write(data)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)


class RejectLine(msgspec.Struct, kw_only=True):
    """One line of the rejects report."""

    source: str
    row: int
    reason: str
    detail: str


class RejectReport:
    """Appends reject lines; :meth:`sync` makes them durable before a checkpoint counts them."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._file: IO[bytes] | None = None
        self._encoder = msgspec.json.Encoder()

    def add(self, line: RejectLine) -> None:
        if self._file is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._file = self.path.open("ab")
        self._file.write(self._encoder.encode(line) + b"\n")

    def sync(self) -> None:
        if self._file is not None:
            self._file.flush()
            os.fsync(self._file.fileno())

    def close(self) -> None:
        if self._file is not None:
            self.sync()
            self._file.close()
            self._file = None


def read_rejects(path: Path) -> Iterator[RejectLine]:
    """Distinct reject lines (a resumed run may have written a row twice), in file order;
    a torn last line (a crash mid-write) is ignored."""
    if not path.exists():
        return
    seen: set[tuple[str, int]] = set()
    decoder = msgspec.json.Decoder(RejectLine)
    with path.open("rb") as lines:
        for raw in lines:
            try:
                line = decoder.decode(raw)
            except msgspec.DecodeError:
                continue
            if (line.source, line.row) not in seen:
                seen.add((line.source, line.row))
                yield line


class PrefixTracker:
    """Advances ``state``'s done prefix as rows complete, in any order.

    Rows are added in increasing order (gaps allowed: a partition's offsets); a row added as
    already done (a reject, a skip) still waits for the rows before it. Memory is bounded by
    the rows in flight.
    """

    def __init__(self, state: SourceState) -> None:
        self.state = state
        self.read_to_end = False  # set by the sender: complete once nothing is in flight
        self._pending: deque[tuple[int, ItemKind]] = deque()
        self._done: set[int] = set()

    @property
    def in_flight(self) -> int:
        return len(self._pending)

    def add(self, row: int, kind: ItemKind, *, done: bool = False) -> None:
        if row <= (self._pending[-1][0] if self._pending else self.state.resume_after()):
            raise ValueError(f"{self.state.name}: row {row} added out of order")
        self._pending.append((row, kind))
        if done:
            self.complete(row)

    def complete(self, row: int) -> None:
        self._done.add(row)
        while self._pending and self._pending[0][0] in self._done:
            done_row, kind = self._pending.popleft()
            self._done.discard(done_row)
            self._advance(done_row, kind)

    def _advance(self, row: int, kind: ItemKind) -> None:
        state = self.state
        state.last_row = row
        state.rows_done += 1
        if kind == "sent":
            state.sent += 1
        elif kind == "rejected":
            state.rejected += 1
        else:
            state.skipped += 1

"""Backfill checkpoints, the done prefix, request ids and the rate limit (no broker)."""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest

from backfill.checkpoint import (
    Checkpoint,
    CheckpointStore,
    PrefixTracker,
    RejectLine,
    RejectReport,
    SourceState,
    read_rejects,
    write_atomically,
)
from backfill.ids import (
    check_backfill_id,
    file_key,
    new_backfill_id,
    replay_request_id,
    request_id,
)
from backfill.pacing import TokenBucket


def state(**fields: object) -> SourceState:
    base: dict[str, object] = {
        "name": "/data/a.csv",
        "kind": "file",
        "key": "k",
        "format": "csv",
        "fingerprint": "f",
    }
    return SourceState(**{**base, **fields})


def checkpoint(*sources: SourceState) -> Checkpoint:
    return Checkpoint(
        backfill_id="bf-1",
        kind="files",
        model="digits",
        created_at=1.0,
        updated_at=1.0,
        sources=list(sources) or [state()],
    )


# --- ids ----------------------------------------------------------------------------------


def test_request_ids_are_a_function_of_backfill_file_and_row(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "a.csv"
    path.write_text("x\n")
    monkeypatch.chdir(tmp_path)
    assert file_key(Path("a.csv")) == file_key(path) == file_key(tmp_path / "." / "a.csv")
    assert file_key(path) != file_key(tmp_path / "b.csv")
    key = file_key(path)
    assert request_id("bf-1", key, 7) == request_id("bf-1", key, 7) == f"bf-1:{key}:7"
    ids = {request_id(b, k, r) for b in ("bf-1", "bf-2") for k in (key, "other") for r in (1, 7)}
    assert len(ids) == 8


def test_replay_ids_keep_the_original_and_stay_within_the_limit() -> None:
    assert replay_request_id("rp-1", "order-42") == "rp-1:order-42"
    long_id = "x" * 256
    derived = replay_request_id("rp-1", long_id)
    assert len(derived) <= 256 and derived == replay_request_id("rp-1", long_id)
    assert derived != replay_request_id("rp-1", "y" * 256)


def test_backfill_ids_are_checked_and_generated_valid() -> None:
    assert check_backfill_id(new_backfill_id()).startswith("bf-")
    assert new_backfill_id("rp", now=0).startswith("rp-19700101-000000-")
    for bad in ("", "-x", "a:b", "a" * 65, "a b"):
        with pytest.raises(ValueError, match="invalid backfill id"):
            check_backfill_id(bad)


# --- the done prefix ------------------------------------------------------------------------


def test_prefix_only_advances_over_contiguous_done_rows() -> None:
    tracker = PrefixTracker(state())
    for row in range(1, 6):
        tracker.add(row, "sent")
    tracker.complete(3)
    tracker.complete(2)
    assert tracker.state.last_row == 0  # row 1 still in flight
    tracker.complete(1)
    assert (tracker.state.last_row, tracker.state.sent) == (3, 3)
    tracker.add(6, "rejected", done=True)  # done, but behind rows 4 and 5
    assert tracker.state.last_row == 3
    tracker.complete(5)
    tracker.complete(4)
    s = tracker.state
    assert (s.last_row, s.rows_done, s.sent, s.rejected, tracker.in_flight) == (6, 6, 5, 1, 0)


def test_prefix_under_random_acknowledgement_order() -> None:
    tracker = PrefixTracker(state())
    rows = list(range(1, 1001))
    for row in rows:
        tracker.add(row, "sent")
    acked: set[int] = set()
    random.Random(7).shuffle(rows)
    for row in rows:
        tracker.complete(row)
        acked.add(row)
        last = tracker.state.last_row
        assert set(range(1, last + 1)) <= acked  # never claims an unacknowledged row
        assert last + 1 not in acked or last == 1000  # and never lags behind a full prefix
    assert tracker.state.rows_done == 1000


def test_partition_offsets_may_have_gaps_and_resume_after_the_prefix() -> None:
    tracker = PrefixTracker(state(kind="partition", first_row=100))
    for offset in (100, 101, 105):
        tracker.add(offset, "skipped" if offset == 101 else "sent", done=offset == 101)
    tracker.complete(105)
    assert tracker.state.resume_after() == 99
    tracker.complete(100)
    assert (tracker.state.last_row, tracker.state.skipped) == (105, 1)
    with pytest.raises(ValueError, match="out of order"):
        tracker.add(104, "sent")


# --- on disk ------------------------------------------------------------------------------


def test_checkpoint_round_trips(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path / "ckpt")
    saved = checkpoint(state(last_row=10, rows_done=10, sent=9, rejected=1, complete=True))
    store.save(saved)
    loaded = store.load("bf-1")
    assert loaded == saved
    assert (loaded.sent, loaded.rejected, loaded.complete) == (9, 1, True)


def test_a_failed_write_leaves_the_previous_checkpoint_and_no_litter(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = CheckpointStore(tmp_path)
    store.save(checkpoint(state(last_row=5)))
    before = store.path("bf-1").read_bytes()

    def crash(_src: object, _dst: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError, match="disk full"):
        store.save(checkpoint(state(last_row=9)))
    assert store.path("bf-1").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bf-1.json"]


def test_atomic_write_replaces_the_whole_file(tmp_path: Path) -> None:
    path = tmp_path / "f.json"
    path.write_bytes(b"x" * 1000)
    write_atomically(path, b"short")
    assert path.read_bytes() == b"short"


def test_rejects_report_is_read_back_without_repeats_or_torn_lines(tmp_path: Path) -> None:
    path = tmp_path / "r.jsonl"
    for _ in range(2):  # a resumed run reports the same rows again
        report = RejectReport(path)
        report.add(RejectLine(source="a", row=3, reason="not_a_number", detail="d"))
        report.add(RejectLine(source="b", row=3, reason="missing_value", detail="d"))
        report.close()
    with path.open("ab") as out:
        out.write(b'{"source": "a", "row": 9, "rea')  # crash mid-line
    assert [(r.source, r.row) for r in read_rejects(path)] == [("a", 3), ("b", 3)]


# --- rate ---------------------------------------------------------------------------------


def test_token_bucket_holds_the_rate_after_its_burst() -> None:
    now = [0.0]
    bucket = TokenBucket(100, burst=10, clock=lambda: now[0])
    waits = [bucket.take() for _ in range(10)]
    assert waits == [0.0] * 10
    assert bucket.take() == pytest.approx(0.01)
    now[0] += 1.0  # a second later: 100 new tokens, capped at the burst of 10
    assert [bucket.take() for _ in range(9)] == [0.0] * 9
    sent, t = 0, 0.0
    bucket = TokenBucket(1000, clock=lambda: t)
    while t < 2.0:
        t += bucket.take() or 0.0
        sent += 1
    assert 2000 <= sent <= 2000 + bucket.burst + 1

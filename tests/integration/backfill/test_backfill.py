"""Backfill, export and replay against the real broker, Redis and stage processes.

One pipeline (validate, infer, persist) serves the whole module; every test uses its own
backfill id, and export and the assertions filter by it.
"""

from __future__ import annotations

import csv
import json
import os
import random
import signal
import subprocess
import sys
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from confluent_kafka import Message, Producer

from backfill.checkpoint import CheckpointStore, read_rejects
from backfill.completeness import ExportReport
from backfill.export import export_backfill
from backfill.ids import file_key, request_id
from backfill.plan import checkpoint_store
from backfill.topics import PartitionRange
from kafkaio.dead_letters import RecordHead, decode_head
from kafkaio.offsets import watermarks
from schemas import Headers
from streaminfer.cli import main
from streaminfer.contexts import backfill_context, range_reader
from streaminfer.kafka import create_topics, make_producer
from streaminfer.settings import Settings
from tests.fixtures import StageProcesses, wait_until
from tests.helpers import MODELS, REPO, REQUESTS, digits_request, encode_raw, holdout

pytestmark = pytest.mark.integration
ROWS = 10_000
PIXELS = [f"px_{i}" for i in range(64)]


@pytest.fixture(scope="module")
def pipeline(services: None, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Settings]:
    """Topics of its own and the three stages, for every test of this module."""
    base = tmp_path_factory.mktemp("backfill")
    env = {
        "STREAMINFER_TOPIC_PREFIX": f"t{uuid.uuid4().hex[:10]}.",
        "STREAMINFER_RUN_DIR": str(base / "run"),
        "STREAMINFER_BACKFILL_CHECKPOINT_DIR": str(base / "checkpoints"),
        "STREAMINFER_BACKFILL_CHECKPOINT_INTERVAL_S": "0.1",
    }
    saved = {name: os.environ.get(name) for name in env}
    os.environ.update(env)  # for the stage and backfill subprocesses
    settings = Settings()
    create_topics(settings)
    stages = StageProcesses(settings, base)
    try:
        stages.start_pipeline()
        yield settings
    finally:
        codes = stages.stop_all()
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
    assert all(code == 0 for code in codes.values()), f"stages exited with {codes}"


# --- fixtures in files ----------------------------------------------------------------------


def digits(rows: int) -> np.ndarray:
    """The held-out digits, tiled to ``rows`` rows (values 0..16, whole numbers)."""
    features, _ = holdout()
    return np.resize(features, (rows, features.shape[1]))


def write_csv(path: Path, x: np.ndarray) -> Path:
    with path.open("w", newline="") as out:
        writer = csv.writer(out)
        writer.writerow(PIXELS)
        writer.writerows(x.astype(int).tolist())
    return path


def write_input_file(fmt: str, directory: Path, x: np.ndarray) -> Path:
    """CSV: 64 columns; JSON lines: one ``pixels`` list per line; Parquet: an ``input`` list."""
    if fmt == "csv":
        return write_csv(directory / "digits.csv", x)
    if fmt == "jsonl":
        path = directory / "digits.jsonl"
        path.write_text("".join(json.dumps({"pixels": row.tolist()}) + "\n" for row in x))
        return path
    path = directory / "digits.parquet"
    pq.write_table(pa.table({"input": pa.array(list(x))}), path, row_group_size=2500)
    return path


def model_labels(x: np.ndarray) -> list[str]:
    session = ort.InferenceSession(str(MODELS / "digits" / "1" / "model.onnx"))
    labels, _ = session.run(None, {"input": x.astype(np.float32)})
    return [str(label) for label in labels]


# --- helpers ------------------------------------------------------------------------------


def new_id(kind: str) -> str:
    return f"{kind}-{uuid.uuid4().hex[:8]}"


def export(settings: Settings, backfill_id: str, to: Path) -> ExportReport:
    """Export once every expected row is present or dead-lettered (or 120 s passed)."""
    report = export_backfill(backfill_context(settings), backfill_id, to, wait_s=120)
    print("\n".join(report.lines()))
    return report


def backfill_cli(*args: str, log: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "streaminfer.cli", "backfill", *args],
        stdout=log.open("ab"),
        stderr=subprocess.STDOUT,
        cwd=REPO,
        env=os.environ.copy(),
    )


def digits_backfill_cli(source: Path, bid: str, *, rate: int, log: Path) -> subprocess.Popen[bytes]:
    """``streaminfer backfill`` of ``source`` into the digits model as ``bid`` at ``rate``
    rows per second, in a child process (its output in ``log``)."""
    return backfill_cli(
        str(source), "--model", "digits", "--backfill-id", bid, "--rate", str(rate), log=log
    )


def rows_done(store: CheckpointStore, backfill_id: str) -> int:
    return store.load(backfill_id).sources[0].rows_done if store.exists(backfill_id) else 0


def records_of(
    settings: Settings, topic: str, backfill_id: str
) -> list[tuple[RecordHead, Message]]:
    """This backfill's records on ``topic`` now (repeats included), with their id and
    attributes. (tests.fixtures.read_topic asks for watermarks between fetches, which wait
    behind the consumer's long-polling fetch: slow on topics of tens of thousands.)"""
    consumer = range_reader(settings)
    try:
        marks = watermarks(consumer, topic)
        starts = {p: low for p, (low, _high) in marks.items()}
        window = PartitionRange(consumer, topic, starts, {p: h for p, (_l, h) in marks.items()})
        found = []
        for batch in window.batches():
            for message in batch:
                head = decode_head(message.value())
                if head is not None and head.attributes.get("backfill_id") == backfill_id:
                    found.append((head, message))
        return found
    finally:
        consumer.close()


def sent_ids(settings: Settings, backfill_id: str) -> list[str]:
    """Every request id this backfill put on inference.requests.backfill (repeats included)."""
    return [
        head.id for head, _ in records_of(settings, settings.topics.requests_backfill, backfill_id)
    ]


def assert_one_row_per_input(out: Path, source: Path, rows: int) -> pa.Table:
    table = pq.read_table(out)
    assert table.num_rows == rows
    ids = table.column("id").to_pylist()
    assert len(set(ids)) == rows
    key = file_key(source)
    expected = {
        request_id(table.column("backfill_id")[0].as_py(), key, r) for r in range(1, rows + 1)
    }
    assert set(ids) == expected
    assert sorted(table.column("row").to_pylist()) == list(range(1, rows + 1))
    assert set(table.column("file").to_pylist()) == {str(source.resolve())}
    return table


# --- tests --------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["csv", "jsonl", "parquet"])
def test_every_row_comes_back_once_joined_to_its_row(
    pipeline: Settings, tmp_path: Path, fmt: str
) -> None:
    x = digits(ROWS)
    source = write_input_file(fmt, tmp_path, x)
    bid = new_id(fmt)
    assert main(["backfill", str(source), "--model", "digits", "--backfill-id", bid]) == 0

    out = tmp_path / "results.parquet"
    report = export(pipeline, bid, out)
    assert report.complete
    assert (report.expected, report.present, report.written) == (ROWS, ROWS, ROWS)
    assert (report.dead_lettered, report.rejected) == (0, 0)
    table = assert_one_row_per_input(out, source, ROWS)
    by_row = dict(
        zip(table.column("row").to_pylist(), table.column("label").to_pylist(), strict=True)
    )
    labels = model_labels(x)
    assert [by_row[r] for r in range(1, ROWS + 1)] == labels  # each result joined to its row


def test_killed_backfill_resumes_without_gaps_or_new_ids(
    pipeline: Settings, tmp_path: Path
) -> None:
    source = write_csv(tmp_path / "digits.csv", digits(ROWS))
    bid = new_id("kill")
    store = checkpoint_store(backfill_context(pipeline))
    kill_at = random.Random().randint(1_000, 7_000)
    print(f"killing {bid} after {kill_at} rows")
    proc = digits_backfill_cli(source, bid, rate=4000, log=tmp_path / "bf.log")
    try:
        wait_until(
            lambda: rows_done(store, bid) >= kill_at or proc.poll() is not None,
            60,
            f"{bid} checkpointed {kill_at} rows",
        )
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == -signal.SIGKILL, (tmp_path / "bf.log").read_text()
    before = rows_done(store, bid)
    assert kill_at <= before < ROWS

    assert main(["backfill", "--backfill-id", bid, "--resume"]) == 0
    checkpoint = store.load(bid)
    assert checkpoint.complete and checkpoint.sent == ROWS

    out = tmp_path / "results.parquet"
    report = export(pipeline, bid, out)
    assert report.complete and (report.present, report.written) == (ROWS, ROWS)
    assert_one_row_per_input(out, source, ROWS)
    ids = sent_ids(pipeline, bid)
    expected = {request_id(bid, file_key(source), r) for r in range(1, ROWS + 1)}
    assert set(ids) == expected  # a re-sent row always reused its id
    print(
        f"{bid}: {len(ids) - ROWS} rows sent twice (acknowledged after the last checkpoint), "
        f"{report.duplicates} duplicate results on inference.results"
    )


def test_ctrl_c_leaves_a_checkpoint_of_exactly_what_kafka_holds(
    pipeline: Settings, tmp_path: Path
) -> None:
    source = write_csv(tmp_path / "digits.csv", digits(ROWS))
    bid = new_id("int")
    store = checkpoint_store(backfill_context(pipeline))
    proc = digits_backfill_cli(source, bid, rate=3000, log=tmp_path / "bf.log")
    wait_until(lambda: rows_done(store, bid) >= 2_000, 60, f"{bid} sent 2000 rows")
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=60) == 130
    log = (tmp_path / "bf.log").read_text()
    assert "--resume" in log
    done = store.load(bid).sources[0]
    assert 2_000 <= done.rows_done == done.last_row < ROWS
    ids = sent_ids(pipeline, bid)
    key = file_key(source)
    assert sorted(ids) == sorted(request_id(bid, key, r) for r in range(1, done.rows_done + 1))

    assert main(["backfill", str(source), "--backfill-id", bid, "--resume"]) == 0
    ids = sent_ids(pipeline, bid)
    assert len(ids) == len(set(ids)) == ROWS  # nothing sent twice after a clean stop


def test_bad_rows_are_reported_or_dead_lettered_with_their_row_numbers(
    pipeline: Settings, tmp_path: Path
) -> None:
    x = digits(200)
    lines = [",".join(str(int(v)) for v in row) for row in x]
    bad = {
        7: ("reject", "not_a_number", lines[6].replace("0", "zero", 1)),
        19: ("reject", "missing_value", "," + lines[18].split(",", 1)[1]),
        42: ("reject", "unparseable", "1,2,3"),
        50: ("dlq", "out_of_range", "99," + lines[49].split(",", 1)[1]),
        51: ("dlq", "out_of_range", "-1," + lines[50].split(",", 1)[1]),
        120: ("dlq", "non_finite", "nan," + lines[119].split(",", 1)[1]),
    }
    for row, (_, _, text) in bad.items():
        lines[row - 1] = text
    source = tmp_path / "bad.csv"
    source.write_text(",".join(PIXELS) + "\n" + "\n".join(lines) + "\n")
    bid = new_id("bad")
    assert main(["backfill", str(source), "--model", "digits", "--backfill-id", bid]) == 0

    store = checkpoint_store(backfill_context(pipeline))
    rejects = {r.row: r.reason for r in read_rejects(store.rejects_path(bid))}
    assert rejects == {row: reason for row, (kind, reason, _) in bad.items() if kind == "reject"}
    assert store.load(bid).sent == 197

    report = export(pipeline, bid, tmp_path / "results.jsonl")
    dead = {row: reason for row, (kind, reason, _) in bad.items() if kind == "dlq"}
    assert report.complete
    assert (report.expected, report.present, report.dead_lettered) == (197, 194, 3)
    assert report.dead_reasons == dict(Counter(dead.values()))
    assert all(
        any(f"row {row}: {reason}" in line for line in report.listed)
        for row, reason in dead.items()
    )
    exported = [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()]
    assert sorted(r["row"] for r in exported) == sorted(set(range(1, 201)) - set(bad))

    found = {
        int(head.attributes["row"]): dict(message.headers() or [])[Headers.DLQ_REASON].decode()
        for head, message in records_of(pipeline, pipeline.topics.dlq, bid)
    }
    assert found == dead


def _forged_result(backfill_id: str, record_id: str, **attributes: str) -> bytes:
    """A well-formed result claiming to be a row of ``backfill_id``."""
    return encode_raw(
        {
            "id": record_id,
            "model": "digits",
            "model_version": "1",
            "status": "ok",
            "outputs": {},
            "created_at": time.time(),
            "attributes": {"source": "backfill", "backfill_id": backfill_id, **attributes},
        }
    )


def test_bad_rows_and_hostile_records_never_break_a_backfill_or_its_export(
    pipeline: Settings, tmp_path: Path
) -> None:
    """A 2 MiB cell is a reject and the run goes on; garbage on the results topic and the
    DLQ, and records forging this backfill's attributes (a row of ``"\u00b2"``, a row out of
    range, another file, the right row with a wrong id), are skipped by the export."""
    lines = [",".join(str(int(v)) for v in row) for row in digits(30)]
    lines[9] = "7" * (2 << 20) + "," + lines[9].split(",", 1)[1]
    source = tmp_path / "cells.csv"
    source.write_text(",".join(PIXELS) + "\n" + "\n".join(lines) + "\n")
    bid = new_id("hostile")
    assert main(["backfill", str(source), "--model", "digits", "--backfill-id", bid]) == 0
    store = checkpoint_store(backfill_context(pipeline))
    assert {r.row: r.reason for r in read_rejects(store.rejects_path(bid))} == {10: "too_large"}

    name, key = str(source.resolve()), file_key(source)
    hostile: list[tuple[str, bytes | None, list[tuple[str | bytes, bytes]] | None]] = [
        ("results", b"\xc1 not msgpack", None),
        ("results", None, [(b"\xff\xfe", b"\xc3\x28")]),
        ("results", b"\x91" * 3000 + b"\xc0", None),
        ("results", _forged_result(bid, f"{bid}:{key}:2", file=name, row="\u00b2"), None),
        ("results", _forged_result(bid, f"{bid}:{key}:999", file=name, row="999"), None),
        ("results", _forged_result(bid, f"{bid}:{key}:3", file="/etc/passwd", row="3"), None),
        ("results", _forged_result(bid, "forged", file=name, row="4"), None),
        ("dlq", _forged_result(bid, f"{bid}:{key}:5", file=name, row="\u00b2"), None),
        ("dlq", b"\xff" * 40, [(b"\xff", b"\xff"), ("dlq.source.offset", b"\xb2")]),
    ]
    producer = Producer({"bootstrap.servers": pipeline.kafka.bootstrap_servers})
    for topic, value, headers in hostile:
        producer.produce(getattr(pipeline.topics, topic), value=value, headers=headers)
    assert producer.flush(30) == 0

    out = tmp_path / "results.parquet"
    report = export(pipeline, bid, out)
    assert report.complete and (report.expected, report.present, report.written) == (29, 29, 29)
    assert report.foreign == 5 and report.dead_lettered == 0 and not report.dead_reasons
    table = pq.read_table(out)
    assert sorted(table.column("row").to_pylist()) == [r for r in range(1, 31) if r != 10]
    assert set(table.column("file").to_pylist()) == {name}


def test_replay_of_a_time_window_resends_exactly_its_requests(
    pipeline: Settings, tmp_path: Path
) -> None:
    start_ms = int(time.time() * 1000) - 600_000  # the broker accepts past timestamps
    x = digits(300)
    window = [f"live-{uuid.uuid4().hex[:8]}-{i}" for i in range(120)]
    producer: Producer = make_producer(pipeline)

    def send(live_id: str, at_ms: int, model: str = "digits", row: int = 0) -> None:
        value = REQUESTS.encode(digits_request(x[row], request_id=live_id, model=model))
        producer.produce(pipeline.topics.requests, key=live_id, value=value, timestamp=at_ms)

    for i in range(50):
        send(f"before-{i}", start_ms - 60_000 + i, row=i)
    for i, live_id in enumerate(window):
        send(live_id, start_ms + i * 50, row=i)
    for i in range(10):
        send(f"other-model-{i}", start_ms + 100 + i, model="cats")
    producer.produce(
        pipeline.topics.requests, key=b"junk", value=b"\xc1 junk", timestamp=start_ms + 7
    )
    for i in range(30):
        send(f"after-{i}", start_ms + 60_000 + i, row=i)
    assert producer.flush(30) == 0

    rid = new_id("rp")
    window_args = ["--from", str(start_ms / 1000), "--to", str((start_ms + 10_000) / 1000)]
    assert main(["replay", *window_args, "--model", "digits", "--replay-id", rid]) == 0
    checkpoint = checkpoint_store(backfill_context(pipeline)).load(rid)
    assert (checkpoint.sent, checkpoint.rejected) == (120, 1)
    assert sum(s.skipped for s in checkpoint.sources) == 10

    out = tmp_path / "replayed.parquet"
    report = export(pipeline, rid, out)
    assert report.complete and report.written == report.present == 120
    table = pq.read_table(out)
    originals = table.column("original_id").to_pylist()
    assert sorted(originals) == sorted(window)
    assert sorted(table.column("id").to_pylist()) == sorted(f"{rid}:{o}" for o in window)
    as_lines = tmp_path / "replayed.jsonl"  # the command line, too
    assert main(["export", "--backfill-id", rid, "--to", str(as_lines)]) == 0
    assert len(as_lines.read_text().splitlines()) == 120

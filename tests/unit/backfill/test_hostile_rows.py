"""No row can fail a backfill: every per-row problem is a reject with its row number and a
reason, the rows around it convert, and a resumed run goes on past it (no broker)."""

from __future__ import annotations

import csv
import io
import json
import random
import threading
import time
import tracemalloc
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from backfill.checkpoint import Checkpoint, CheckpointStore, read_rejects
from backfill.convert import Chunk, Reject
from backfill.csvrecords import RecordCutter, TooLarge
from backfill.engine import RunOutcome
from backfill.files import FileSource, new_file_state
from backfill.mapping import plan_mapping
from backfill.readers import CsvReader, FileReader, JsonLinesReader, ParquetReader
from schemas.models import ModelSpec, TensorSpec
from tests.unit.backfill.engine_run import AckingProducer, run_engine

DIGITS = ModelSpec(
    name="m",
    default_version="1",
    versions={"1": Path("m.onnx")},
    inputs=(TensorSpec("input", "float32", (64,), 0.0, 16.0),),
    outputs=(),
)
GOOD = json.dumps([1.0] * 64)
MIB = 1 << 20


def read_all(reader: FileReader, after_row: int = 0) -> tuple[list[int], list[Reject]]:
    """Rows that became arrays, and rejects, over every chunk."""
    mapping = plan_mapping(DIGITS, reader.columns(), None)
    chunks: list[Chunk] = list(reader.chunks(mapping, after_row=after_row))
    for chunk in chunks:
        assert chunk.inputs["input"].shape == (len(chunk.rows), 64)
    rows = [int(r) for c in chunks for r in c.rows]
    return rows, [r for c in chunks for r in c.rejects]


def reasons(rejects: list[Reject]) -> dict[int, str]:
    return {r.row: r.reason for r in rejects}


def jsonl(path: Path, lines: list[str]) -> Path:
    path.write_text("".join(f"{line}\n" for line in lines))
    return path


# --- JSON lines -------------------------------------------------------------------------------


def test_a_json_line_nested_2000_deep_is_a_reject(tmp_path: Path) -> None:
    deep = "[" * 2000 + "]" * 2000
    path = jsonl(tmp_path / "a.jsonl", [GOOD, deep, GOOD, '{"x": ' + deep + "}"])
    rows, rejects = read_all(JsonLinesReader(path))
    assert rows == [1, 3]
    assert reasons(rejects) == {2: "too_deep", 4: "too_deep"}


@pytest.mark.parametrize("digits", [400, 5000])  # 5000: beyond Python's int-to-str limit too
def test_an_integer_no_float_can_hold_is_a_reject(tmp_path: Path, digits: int) -> None:
    huge = "1" + "0" * digits
    path = jsonl(tmp_path / "a.jsonl", [GOOD, "[" + ",".join(["1"] * 63 + [huge]) + "]", GOOD])
    rows, rejects = read_all(JsonLinesReader(path))
    assert rows == [1, 3]
    (reject,) = rejects
    # msgspec reads 400 digits as a Python int (too large for float64: ours to refuse) and
    # refuses 5000 digits itself
    assert (reject.row, reject.reason) == (2, "out_of_range" if digits == 400 else "unparseable")
    assert "float64" in reject.detail or "out of range" in reject.detail


def test_a_json_line_over_the_limit_is_read_past_in_pieces(tmp_path: Path) -> None:
    big = "[" + ",".join(["0"] * (MIB // 2 + 10)) + "]"  # just over 1 MiB
    path = jsonl(tmp_path / "a.jsonl", [GOOD, big, GOOD, "", GOOD])
    rows, rejects = read_all(JsonLinesReader(path))
    assert rows == [1, 3, 4]  # the blank line is not a row
    assert reasons(rejects) == {2: "too_large"}
    assert "1,048,576" in rejects[0].detail
    assert read_all(JsonLinesReader(path), after_row=2) == ([3, 4], [])


def test_a_list_longer_than_the_input_stops_counting_early(tmp_path: Path) -> None:
    path = jsonl(tmp_path / "a.jsonl", [json.dumps([[0.0] * 1000] * 100), GOOD])
    rows, rejects = read_all(JsonLinesReader(path))
    assert rows == [2] and reasons(rejects) == {1: "wrong_length"}


# --- CSV --------------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [MIB + 10, 3 * MIB])
@pytest.mark.parametrize("where", ["first", "middle", "last"])
def test_a_csv_cell_over_the_block_size_is_a_reject(tmp_path: Path, size: int, where: str) -> None:
    cells = [f'"{GOOD}"'] * 3
    position = {"first": 0, "middle": 1, "last": 2}[where]
    cells[position] = "7" * size
    path = tmp_path / "a.csv"
    path.write_text("input,n\n" + "".join(f"{cell},{i}\n" for i, cell in enumerate(cells)))
    rows, rejects = read_all(CsvReader(path))
    assert reasons(rejects) == {position + 1: "too_large"}
    assert rows == [r for r in (1, 2, 3) if r != position + 1]


def test_a_quoted_cell_with_line_breaks_over_the_limit_is_one_reject(tmp_path: Path) -> None:
    huge = '"' + "a\n" * (MIB // 2 + 10) + '"'
    path = tmp_path / "a.csv"
    path.write_text(f'input\n"{GOOD}"\n{huge}\n"{GOOD}"\n')
    rows, rejects = read_all(CsvReader(path))
    assert rows == [1, 3] and reasons(rejects) == {2: "too_large"}


def test_csv_cells_that_nest_or_overflow_are_rejects(tmp_path: Path) -> None:
    huge = "[" + ",".join(["1"] * 63 + ["1" + "0" * 400]) + "]"
    deep = "[" * 2000 + "]" * 2000
    path = tmp_path / "a.csv"
    path.write_text(f'input\n"{GOOD}"\n"{huge}"\n"{deep}"\n"{GOOD}"\n')
    rows, rejects = read_all(CsvReader(path))
    assert rows == [1, 4]
    assert reasons(rejects) == {2: "out_of_range", 3: "too_deep"}


def test_a_record_pyarrow_refuses_rejects_only_itself(tmp_path: Path) -> None:
    """Invalid UTF-8 fails pyarrow's whole parse: the batch is halved until it is found."""
    lines = [b"input"] + [f'"{GOOD}"'.encode()] * 50
    lines[20] = b'"\xff\xfe"'
    lines[40] = b"a,b,c"  # too many fields: pyarrow's own invalid-row handler
    path = tmp_path / "a.csv"
    path.write_bytes(b"\n".join(lines) + b"\n")
    rows, rejects = read_all(CsvReader(path))
    assert reasons(rejects) == {20: "unparseable", 40: "unparseable"}
    assert rows == [r for r in range(1, 51) if r not in (20, 40)]


def test_csv_resume_skips_rows_without_parsing_them(tmp_path: Path) -> None:
    path = tmp_path / "a.csv"
    path.write_text("input\n" + f'"{GOOD}"\n' * 5 + "x" * (2 * MIB) + "\n" + f'"{GOOD}"\n' * 2)
    assert read_all(CsvReader(path), after_row=6) == ([7, 8], [])
    rows, rejects = read_all(CsvReader(path), after_row=3)
    assert rows == [4, 5, 7, 8] and reasons(rejects) == {6: "too_large"}


def _random_csv(rng: random.Random) -> bytes:
    pieces = [b"a", b"b", b",", b'"', b'""', b"\n", b"\r\n", b"\r", b" ", b"x,y"]
    return b"".join(rng.choice(pieces) for _ in range(rng.randint(0, 60)))


@pytest.mark.parametrize("seed", range(300))
def test_the_cut_matches_pythons_csv_module(seed: int) -> None:
    """Quotes open a value only at a field's start; ``""`` is a quote; line ends in quotes
    belong to the value: the records are the ones ``csv`` reads, cut at any block size."""
    rng = random.Random(seed)
    data = _random_csv(rng)
    text = data.decode("latin-1")
    expected = [row for row in csv.reader(io.StringIO(text, newline="")) if row]
    cutter = RecordCutter(io.BytesIO(data), max_bytes=1000, read_bytes=rng.randint(1, 9))
    records = list(cutter.records())
    assert all(isinstance(r, bytes) for r in records)
    got = [
        row
        for r in records
        if isinstance(r, bytes)
        for row in csv.reader(io.StringIO(r.decode("latin-1"), newline=""))
    ]
    assert got == expected, (data, records)


def test_the_cut_never_holds_an_oversized_record() -> None:
    data = b"h\n" + b"1\n" + b'"' + b"x" * 5000 + b'\n"' + b"\n2\n"
    records = list(RecordCutter(io.BytesIO(data), max_bytes=100, read_bytes=64).records())
    assert records == [b"h", b"1", TooLarge(5003), b"2"]


# --- Parquet ----------------------------------------------------------------------------------


def test_a_parquet_list_of_5m_zeros_is_rejected_before_python_sees_it(tmp_path: Path) -> None:
    path = tmp_path / "a.parquet"
    column = pa.array(
        [[1.0] * 64, np.zeros(5_000_000, dtype=np.float32), [2.0] * 64],
        type=pa.list_(pa.float32()),
    )
    pq.write_table(pa.table({"input": column}), path, compression="zstd")
    assert path.stat().st_size < 4096  # a tiny file that is huge as Python floats
    tracemalloc.start()
    try:
        rows, rejects = read_all(ParquetReader(path))
        _size, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert rows == [1, 3] and reasons(rejects) == {2: "wrong_length"}
    assert "5000000" in rejects[0].detail
    assert peak < 40 * MIB, f"{peak / MIB:.0f} MiB of Python objects"


def test_nested_and_sliced_lists_are_measured_by_their_leaves(tmp_path: Path) -> None:
    path = tmp_path / "a.parquet"
    good = [[1.0] * 8] * 8
    column = pa.array(
        [good, [[0.0] * 1000] * 8, good, None, [[1.0] * 8] * 7 + [[1.0] * 9]],
        type=pa.list_(pa.list_(pa.float64())),
    )
    pq.write_table(pa.table({"input": column}), path, row_group_size=2)
    rows, rejects = read_all(ParquetReader(path, batch_rows=2))
    assert rows == [1, 3]
    assert reasons(rejects) == {2: "wrong_length", 4: "missing_value", 5: "wrong_length"}
    assert read_all(ParquetReader(path), after_row=2)[0] == [3]


def test_a_huge_parquet_string_cell_is_a_reject(tmp_path: Path) -> None:
    path = tmp_path / "a.parquet"
    pq.write_table(pa.table({"input": [GOOD, "[" + "0," * MIB + "0]", GOOD]}), path)
    rows, rejects = read_all(ParquetReader(path))
    assert rows == [1, 3] and reasons(rejects) == {2: "too_large"}


# --- a whole run ------------------------------------------------------------------------------


def _run(
    store: CheckpointStore, path: Path, producer: AckingProducer, stop: threading.Event
) -> tuple[RunOutcome, Checkpoint]:
    reader = JsonLinesReader(path)
    checkpoint = (
        store.load("bf")
        if store.exists("bf")
        else Checkpoint(
            backfill_id="bf",
            kind="files",
            model="m",
            created_at=time.time(),
            updated_at=time.time(),
            sources=[new_file_state(reader)],
        )
    )
    source = FileSource(
        reader=reader,
        mapping=plan_mapping(DIGITS, reader.columns(), None),
        state=checkpoint.sources[0],
        backfill_id="bf",
        model="m",
        version=None,
    )
    outcome = run_engine(producer, store, checkpoint, [source], stop=stop)
    return outcome, checkpoint


def test_bad_rows_never_fail_a_run_and_resume_goes_past_them(tmp_path: Path) -> None:
    lines = [GOOD] * 40
    lines[9] = "[" * 2000 + "]" * 2000
    lines[19] = "[" + ",".join(["1"] * 63 + ["1" + "0" * 400]) + "]"
    lines[29] = "[" + "0," * (MIB // 2) + "0]"
    path = jsonl(tmp_path / "rows.jsonl", lines)
    store = CheckpointStore(tmp_path / "checkpoints")

    stop = threading.Event()
    first = AckingProducer(on_produce=lambda n: stop.set() if n == 9 else None)
    outcome, checkpoint = _run(store, path, first, stop)  # stopped right before row 10
    assert outcome.status == "interrupted" and checkpoint.sources[0].last_row == 9

    outcome, checkpoint = _run(store, path, AckingProducer(), threading.Event())
    assert outcome.status == "done", outcome.error
    state = checkpoint.sources[0]
    assert (state.last_row, state.sent, state.rejected, state.complete) == (40, 37, 3, True)
    found = {(r.row, r.reason) for r in read_rejects(store.rejects_path("bf"))}
    assert found == {(10, "too_deep"), (20, "out_of_range"), (30, "too_large")}
    assert all(r.source == str(path.resolve()) for r in read_rejects(store.rejects_path("bf")))

"""Export bookkeeping and file writers (no broker)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from backfill.checkpoint import Checkpoint, SourceState
from backfill.completeness import ExportTally, SourceTally, report_for
from backfill.ids import request_id
from schemas import Headers, ResultV1, tensor_from_array
from sinks.files import JsonLinesResultWriter, ParquetResultWriter, open_writer

FILE = "/data/a.csv"


def result(row: int, backfill_id: str = "bf") -> ResultV1:
    probabilities = np.full(10, 0.1, dtype=np.float32)
    return ResultV1(
        id=request_id(backfill_id, "k", row),
        model="digits",
        model_version="1",
        status="ok",
        outputs={
            "label": tensor_from_array(np.int64(row % 10)),
            "probabilities": tensor_from_array(probabilities),
        },
        created_at=1.0,
        label=str(row % 10),
        scores={str(i): 0.1 for i in range(10)},
        timings={"inferred": 2.0},
        attributes={
            "source": "backfill",
            "backfill_id": backfill_id,
            "file": FILE,
            "row": str(row),
        },
    )


class DeadLetterRecord:
    """The two things the tally reads from a consumed DLQ record."""

    def __init__(self, reason: str) -> None:
        self._headers = [(Headers.DLQ_REASON, reason.encode()), (Headers.DLQ_ERROR, b"why")]

    def headers(self) -> list[tuple[str, bytes]]:
        return self._headers


def test_tally_counts_each_row_once_and_finds_what_is_missing() -> None:
    state = SourceState(
        name=FILE, kind="file", key="k", format="csv", fingerprint="f", last_row=6, sent=5
    )
    tally = ExportTally(
        backfill_id="bf", sources={FILE: SourceTally.of(state, "bf", [3])}, rejected=1
    )
    seen = [tally.first_time(r.id, r.attributes) for r in map(result, (1, 2, 1, 4, 9, 9))]
    assert seen == [True, True, False, True, True, False]  # row 9: after the checkpoint
    five = result(5)
    tally.dead_letter(five.id, five.attributes, DeadLetterRecord("out_of_range"))
    assert not tally.complete()  # row 6 is neither stored nor dead-lettered

    checkpoint = Checkpoint(
        backfill_id="bf", kind="files", model="digits", created_at=0, updated_at=0, sources=[state]
    )
    report = report_for(checkpoint, tally, Path("out.parquet"), show=5)
    assert (report.expected, report.present, report.dead_lettered, report.missing) == (5, 3, 1, 1)
    assert report.beyond_checkpoint == 1 and report.dead_reasons == {"out_of_range": 1}
    assert any("row 5: out_of_range" in line for line in report.listed)
    assert any(line == f"missing {FILE} row 6" for line in report.listed)
    assert not report.complete


def test_a_forged_id_does_not_count_for_the_row_it_names() -> None:
    state = SourceState(
        name=FILE, kind="file", key="k", format="csv", fingerprint="f", last_row=2, sent=2
    )
    tally = ExportTally(
        backfill_id="bf", sources={FILE: SourceTally.of(state, "bf", [])}, rejected=0
    )
    other = result(1, backfill_id="other")
    assert tally.first_time(other.id, {**other.attributes, "backfill_id": "bf"})
    assert tally.sources[FILE].present.sum() == 0


def test_parquet_writer_writes_row_groups_and_typed_outputs(tmp_path: Path) -> None:
    path = tmp_path / "out.parquet"
    writer = open_writer(path)
    assert isinstance(writer, ParquetResultWriter)
    writer = ParquetResultWriter(path, rows_per_group=2)
    for row in (1, 2, 4):
        writer.add(result(row))
    assert not path.exists()  # nothing under the name before close
    writer.close()
    table = pq.read_table(path)
    assert table.column("row").to_pylist() == [1, 2, 4]
    assert pq.ParquetFile(path).metadata.num_row_groups == 2
    assert table.column("output_label").to_pylist() == [1, 2, 4]
    assert table.column("output_probabilities")[0].as_py() == pytest.approx([0.1] * 10)
    assert dict(table.column("scores")[0].as_py())["3"] == pytest.approx(0.1)


def test_jsonl_writer_and_abort(tmp_path: Path) -> None:
    path = tmp_path / "out.jsonl"
    writer = JsonLinesResultWriter(path)
    writer.add(result(7))
    writer.close()
    (line,) = [json.loads(x) for x in path.read_text().splitlines()]
    assert (line["row"], line["file"], line["label"], line["output_label"]) == (7, FILE, "7", 7)

    aborted = tmp_path / "aborted.parquet"
    writer = ParquetResultWriter(aborted, rows_per_group=1)
    writer.add(result(1))
    writer.abort()
    assert list(tmp_path.iterdir()) == [path]

"""Export bookkeeping and file writers (no broker)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, cast

import numpy as np
import pyarrow.parquet as pq
import pytest
from confluent_kafka import Message

from backfill.checkpoint import Checkpoint, SourceState
from backfill.completeness import ExportTally, SourceTally, plain_row, report_for
from backfill.ids import request_id
from kafkaio.dead_letters import DeadLetter, read_dead_letter
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


class DlqRecord:
    """The parts of a consumed DLQ record that :func:`read_dead_letter` reads."""

    def __init__(self, reason: str) -> None:
        self._headers = [(Headers.DLQ_REASON, reason.encode()), (Headers.DLQ_ERROR, b"why")]

    def headers(self) -> list[tuple[str, bytes]]:
        return self._headers

    def value(self) -> bytes:
        return b""

    def key(self) -> bytes | None:
        return None


def dead_letter(reason: str) -> DeadLetter:
    return read_dead_letter(cast(Message, DlqRecord(reason)))


def state(*, last_row: int, sent: int, complete: bool = True) -> SourceState:
    return SourceState(
        name=FILE,
        kind="file",
        key="k",
        format="csv",
        fingerprint="f",
        last_row=last_row,
        sent=sent,
        complete=complete,
    )


def tally_for(source: SourceState, rejected: list[int] | None = None) -> ExportTally:
    return ExportTally(
        backfill_id="bf", sources={FILE: SourceTally.of(source, "bf", rejected or [])}, rejected=0
    )


def test_tally_counts_each_row_once_and_finds_what_is_missing() -> None:
    source = state(last_row=6, sent=5, complete=False)
    tally = ExportTally(
        backfill_id="bf", sources={FILE: SourceTally.of(source, "bf", [3])}, rejected=1
    )
    seen = [tally.admit(r.id, r.attributes) for r in map(result, (1, 2, 1, 4, 9, 9))]
    # row 9: after the checkpoint of an unfinished run, exported once
    assert seen == ["new", "new", "duplicate", "new", "new", "duplicate"]
    five = result(5)
    tally.dead_letter(five.id, five.attributes, dead_letter("out_of_range"))
    assert not tally.complete()  # row 6 is neither stored nor dead-lettered

    checkpoint = Checkpoint(
        backfill_id="bf", kind="files", model="digits", created_at=0, updated_at=0, sources=[source]
    )
    report = report_for(checkpoint, tally, Path("out.parquet"), show=5)
    assert (report.expected, report.present, report.dead_lettered, report.missing) == (5, 3, 1, 1)
    assert report.beyond_checkpoint == 1 and report.dead_reasons == {"out_of_range": 1}
    assert any("row 5: out_of_range" in line for line in report.listed)
    assert any(line == f"missing {FILE} row 6" for line in report.listed)
    assert not report.complete


def test_a_forged_id_does_not_count_for_the_row_it_names() -> None:
    tally = tally_for(state(last_row=2, sent=2, complete=False))
    other = result(1, backfill_id="other")
    assert tally.admit(other.id, {**other.attributes, "backfill_id": "bf"}) == "foreign"
    assert tally.sources[FILE].present.sum() == 0 and tally.foreign == 1


@pytest.mark.parametrize(
    "row",
    ["\u00b2", "\u0663", "\uff11", "-1", "+1", " 1", "1 ", "1.0", "", "0x1", "1" * 20, "0", "3"],
)
def test_a_row_attribute_that_is_not_a_plain_row_in_range_is_foreign(row: str) -> None:
    """Superscripts and other digits pass str.isdigit and break int(); out-of-range and
    padded numbers name no row of the (complete, rows 1-2) checkpoint."""
    tally = tally_for(state(last_row=2, sent=2))
    forged = result(1)
    attributes = {**forged.attributes, "row": row}
    assert tally.admit(forged.id, attributes) == "foreign"
    tally.dead_letter(forged.id, attributes, dead_letter("malformed"))
    assert tally.foreign == 2 and not tally.dead_reasons and not tally.dead_details
    assert tally.sources[FILE].present.sum() == 0 and tally.sources[FILE].dead.sum() == 0


@pytest.mark.parametrize(
    "attributes",
    [
        {"file": "/data/other.csv"},  # not one of the checkpoint's sources
        {"file": 7},  # not even text
        {"row": 1},
        {"backfill_id": "someone-else"},
        {"row": None},
    ],
)
def test_forged_files_and_types_are_foreign(attributes: dict[str, object]) -> None:
    tally = tally_for(state(last_row=2, sent=2))
    forged = result(1)
    merged: dict[str, Any] = {**forged.attributes, **attributes}
    assert tally.admit(forged.id, merged) == "foreign"
    assert tally.sources[FILE].present.sum() == 0


def test_plain_row_reads_only_ascii_digits() -> None:
    assert [plain_row(v) for v in ("1", "007", "9" * 19)] == [1, 7, int("9" * 19)]
    assert [plain_row(v) for v in ("\u00b2", "1" * 20, "", None, 3, "-2")] == [None] * 6


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

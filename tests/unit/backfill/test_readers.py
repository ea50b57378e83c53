"""Backfill file readers and the column -> input mapping rules (no broker)."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from backfill.convert import Chunk, Reject
from backfill.mapping import (
    WHOLE_RECORD,
    MappingError,
    parse_columns_option,
    plan_mapping,
)
from backfill.readers import (
    CsvReader,
    JsonLinesReader,
    ParquetReader,
    detect_format,
    open_reader,
)
from schemas.models import ModelSpec, TensorSpec
from tests.helpers import holdout

PIXELS = [f"px_{i}" for i in range(64)]


def spec(*inputs: TensorSpec) -> ModelSpec:
    return ModelSpec(
        name="m",
        default_version="1",
        versions={"1": Path("m.onnx")},
        inputs=inputs or (TensorSpec("input", "float32", (64,), 0.0, 16.0),),
        outputs=(),
    )


DIGITS = spec()


def read_all(reader: CsvReader | JsonLinesReader | ParquetReader, after_row: int = 0) -> Chunk:
    """Every chunk of ``reader`` concatenated (and how many chunks there were)."""
    mapping = plan_mapping(DIGITS, reader.columns(), None)
    chunks = list(reader.chunks(mapping, after_row=after_row))
    assert all(np.all(np.diff(c.rows) > 0) for c in chunks)
    return Chunk(
        rows=np.concatenate([c.rows for c in chunks]),
        inputs={"input": np.concatenate([c.inputs["input"] for c in chunks])},
        rejects=[r for c in chunks for r in c.rejects],
    )


@pytest.fixture(scope="module")
def features() -> np.ndarray:
    return holdout()[0][:100]


def write_csv(path: Path, header: list[str], lines: list[str]) -> Path:
    path.write_text(",".join(header) + "\n" + "".join(f"{line}\n" for line in lines))
    return path


def csv_rows(x: np.ndarray) -> list[str]:
    return [",".join(str(int(v)) for v in row) for row in x]


# --- mapping rules ------------------------------------------------------------------------


def test_sixty_four_columns_in_file_order_feed_a_one_input_model() -> None:
    columns = [f"pixel_{r}_{c}" for r in range(8) for c in range(8)]
    (mapped,) = plan_mapping(DIGITS, columns, None)
    assert mapped.columns == tuple(columns) and not mapped.packed


def test_one_column_holds_the_whole_example() -> None:
    (mapped,) = plan_mapping(DIGITS, ["pixels"], None)
    assert mapped.columns == ("pixels",) and mapped.packed


def test_a_column_named_after_the_input_wins_over_the_others() -> None:
    (mapped,) = plan_mapping(DIGITS, ["id", "input", "label"], None)
    assert mapped.columns == ("input",)


def test_indexed_columns_are_taken_in_index_order_whatever_the_file_order() -> None:
    columns = ["id", *reversed([f"input_{i}" for i in range(64)])]
    (mapped,) = plan_mapping(DIGITS, columns, None)
    assert mapped.columns == tuple(f"input_{i}" for i in range(64))


def test_unmappable_columns_are_an_error_naming_them() -> None:
    with pytest.raises(MappingError, match=r"65 columns \('px_0', .*'px_63', 'label'\)"):
        plan_mapping(DIGITS, [*PIXELS, "label"], None)


def test_columns_option_with_globs_and_names() -> None:
    columns = ["label", *PIXELS]
    (mapped,) = plan_mapping(DIGITS, columns, parse_columns_option(["px_*"]))
    assert mapped.columns == tuple(PIXELS)
    (mapped,) = plan_mapping(DIGITS, ["a", "b"], parse_columns_option(["input=b"]))
    assert mapped.columns == ("b",)


def test_columns_option_must_give_the_right_count() -> None:
    with pytest.raises(MappingError, match="64 values"):
        plan_mapping(DIGITS, PIXELS, parse_columns_option(["px_1,px_2"]))
    with pytest.raises(MappingError, match="matches no column"):
        plan_mapping(DIGITS, PIXELS, parse_columns_option(["nope_*"]))
    with pytest.raises(MappingError, match="not inputs"):
        plan_mapping(DIGITS, PIXELS, parse_columns_option(["other=px_1"]))


def test_two_input_model_needs_names_per_input() -> None:
    model = spec(TensorSpec("a", "float32", (2,)), TensorSpec("b", "int64", ()))
    a, b = plan_mapping(model, ["a_0", "a_1", "b"], None)
    assert a.columns == ("a_0", "a_1") and b.columns == ("b",)
    with pytest.raises(MappingError, match="INPUT=COLS"):
        plan_mapping(model, ["x", "y"], parse_columns_option(["x"]))


def test_format_is_detected_from_the_name() -> None:
    assert detect_format(Path("a.CSV")) == "csv"
    assert detect_format(Path("a.jsonl.gz")) == "jsonl"
    assert detect_format(Path("x/part-0.parquet")) == "parquet"
    with pytest.raises(MappingError, match="--format"):
        detect_format(Path("a.txt"))


# --- the three formats read the same rows ----------------------------------------------------


def test_csv_streams_in_several_batches_with_row_numbers(
    tmp_path: Path, features: np.ndarray
) -> None:
    path = write_csv(tmp_path / "d.csv", PIXELS, csv_rows(features))
    reader = CsvReader(path, max_row_bytes=4096)
    chunks = list(reader.chunks(plan_mapping(DIGITS, reader.columns(), None)))
    assert len(chunks) > 3  # streamed, not read whole
    got = read_all(reader)
    np.testing.assert_array_equal(got.rows, np.arange(1, 101))
    np.testing.assert_array_equal(got.inputs["input"], features)
    assert got.inputs["input"].dtype == np.float32
    assert reader.estimate_rows() == 100


def test_parquet_list_column_and_row_group_skipping(tmp_path: Path, features: np.ndarray) -> None:
    path = tmp_path / "d.parquet"
    pq.write_table(pa.table({"pixels": pa.array(list(features))}), path, row_group_size=30)
    got = read_all(ParquetReader(path, batch_rows=7), after_row=65)
    np.testing.assert_array_equal(got.rows, np.arange(66, 101))
    np.testing.assert_array_equal(got.inputs["input"], features[65:])


def test_parquet_scalar_columns(tmp_path: Path, features: np.ndarray) -> None:
    path = tmp_path / "d.parquet"
    pq.write_table(pa.table({c: features[:, i] for i, c in enumerate(PIXELS)}), path)
    got = read_all(open_reader(path, "parquet"))
    np.testing.assert_array_equal(got.inputs["input"], features)


def test_json_lines_objects_arrays_and_gzip(tmp_path: Path, features: np.ndarray) -> None:
    objects = tmp_path / "o.jsonl"
    objects.write_text("".join(json.dumps({"input": x.tolist()}) + "\n\n" for x in features))
    arrays = tmp_path / "a.jsonl.gz"
    with gzip.open(arrays, "wt") as out:
        out.writelines(json.dumps(x.tolist()) + "\n" for x in features)
    assert JsonLinesReader(arrays).columns() == [WHOLE_RECORD]
    for path in (objects, arrays):
        got = read_all(JsonLinesReader(path, batch_rows=16), after_row=10)
        np.testing.assert_array_equal(got.rows, np.arange(11, 101))  # blank lines not counted
        np.testing.assert_array_equal(got.inputs["input"], features[10:])


# --- bad rows -----------------------------------------------------------------------------


def test_csv_bad_rows_are_rejected_with_their_row_numbers(
    tmp_path: Path, features: np.ndarray
) -> None:
    lines = csv_rows(features[:10])
    lines[2] = lines[2].replace("0", "zero", 1)  # row 3: not a number
    lines[4] = ",".join(lines[4].split(",")[:-1]) + ","  # row 5: empty value
    lines[6] = "1,2,3"  # row 7: wrong field count (pyarrow skips it)
    lines[9] = lines[9] + ",99"  # row 10, the last: too many fields
    lines[1] = lines[1].replace("0", "99", 1)  # row 2: out of range, but a valid request
    got = read_all(CsvReader(write_csv(tmp_path / "bad.csv", PIXELS, lines)))
    assert [(r.row, r.reason) for r in got.rejects] == [
        (3, "not_a_number"),
        (5, "missing_value"),
        (7, "unparseable"),
        (10, "unparseable"),
    ]
    np.testing.assert_array_equal(got.rows, [1, 2, 4, 6, 8, 9])
    assert got.inputs["input"][1].max() == 99  # validate dead-letters it, not the reader
    np.testing.assert_array_equal(got.inputs["input"][2], features[3])


def test_csv_row_numbers_skip_blank_lines_like_pyarrow(tmp_path: Path) -> None:
    path = tmp_path / "blank.csv"
    path.write_text('a\n"[1,2]"\n\n"[3]"\n"[4,5]"\n')
    model = spec(TensorSpec("input", "float32", (2,)))
    reader = CsvReader(path)
    (chunk,) = list(reader.chunks(plan_mapping(model, reader.columns(), None)))
    assert chunk.rows.tolist() == [1, 3]
    assert chunk.rejects == [Reject(2, "wrong_length", chunk.rejects[0].detail)]


def test_json_lines_bad_rows(tmp_path: Path, features: np.ndarray) -> None:
    good = [json.dumps({"input": x.tolist()}) for x in features[:6]]
    good[1] = "{not json"
    good[2] = json.dumps({"other": 1})
    good[3] = json.dumps({"input": features[0].tolist()[:10]})
    good[4] = json.dumps({"input": [None, *features[0].tolist()[1:]]})
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(good) + "\n")
    got = read_all(JsonLinesReader(path))
    assert [(r.row, r.reason) for r in got.rejects] == [
        (2, "unparseable"),
        (3, "missing_column"),
        (4, "wrong_length"),
        (5, "missing_value"),
    ]
    assert got.rows.tolist() == [1, 6]


def test_parquet_nulls_reject_only_their_row(tmp_path: Path, features: np.ndarray) -> None:
    values = list(features[:5])
    values[3] = None
    path = tmp_path / "null.parquet"
    pq.write_table(pa.table({"input": pa.array(values, type=pa.list_(pa.float32()))}), path)
    got = read_all(ParquetReader(path))
    assert [(r.row, r.reason) for r in got.rejects] == [(4, "missing_value")]
    assert got.rows.tolist() == [1, 2, 3, 5]


def test_integer_inputs_reject_fractions(tmp_path: Path) -> None:
    model = spec(TensorSpec("n", "int64", ()))
    path = write_csv(tmp_path / "ints.csv", ["n"], ["1", "2.5", "3"])
    reader = CsvReader(path)
    (chunk,) = list(reader.chunks(plan_mapping(model, reader.columns(), None)))
    assert chunk.rows.tolist() == [1, 3] and chunk.inputs["n"].tolist() == [1, 3]
    assert chunk.inputs["n"].dtype == np.int64
    assert [(r.row, r.reason) for r in chunk.rejects] == [(2, "not_an_integer")]

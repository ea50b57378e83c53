"""``streaminfer backfill`` refuses mistakes before it sends anything (no broker needed:
planning happens before the first Kafka client is made)."""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from backfill.context import BackfillContext
from backfill.plan import UsageError, checkpoint_store, plan_files
from streaminfer.cli import build_parser, main
from streaminfer.contexts import backfill_context
from streaminfer.settings import Settings
from tests.helpers import holdout


@pytest.fixture()
def context(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> BackfillContext:
    """The backfill commands' context, from the environment as ``main()`` reads it too."""
    monkeypatch.setenv("STREAMINFER_BACKFILL_CHECKPOINT_DIR", str(tmp_path / "checkpoints"))
    # Nothing here may reach Kafka; should a test get that far, it fails fast on a closed port.
    monkeypatch.setenv("KAFKA_BOOTSTRAP_SERVERS", "127.0.0.1:1")
    monkeypatch.setenv("STREAMINFER_DELIVERY_TIMEOUT_S", "1")
    return backfill_context(Settings())


@pytest.fixture()
def csv_file(tmp_path: Path) -> Path:
    x = holdout()[0][:20].astype(int)
    path = tmp_path / "d.csv"
    header = ",".join(f"px_{i}" for i in range(64))
    path.write_text(header + "\n" + "\n".join(",".join(map(str, row)) for row in x) + "\n")
    return path


def args(*argv: str) -> argparse.Namespace:
    return build_parser().parse_args(["backfill", *argv])


def test_plan_records_every_file_before_sending(context: BackfillContext, csv_file: Path) -> None:
    plan = plan_files(context, args(str(csv_file), "--model", "digits", "--backfill-id", "b1"))
    saved = checkpoint_store(context).load("b1")
    assert [s.name for s in saved.sources] == [str(csv_file.resolve())]
    assert saved.sources[0].estimated_rows == 20 and saved.sources[0].last_row == 0
    assert len(plan.sources) == 1


def test_an_existing_backfill_is_not_started_twice(
    context: BackfillContext, csv_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    plan_files(context, args(str(csv_file), "--model", "digits", "--backfill-id", "b1"))
    code = main(["backfill", str(csv_file), "--model", "digits", "--backfill-id", "b1"])
    assert code == 2
    assert "--resume" in capsys.readouterr().err


def test_resume_refuses_a_changed_file(context: BackfillContext, csv_file: Path) -> None:
    plan_files(context, args(str(csv_file), "--model", "digits", "--backfill-id", "b1"))
    with csv_file.open("a") as out:
        out.write(",".join(["1"] * 64) + "\n")
    with pytest.raises(UsageError, match="changed since the checkpoint"):
        plan_files(context, args("--backfill-id", "b1", "--resume"))
    with pytest.raises(UsageError, match="differs"):
        plan_files(context, args("--backfill-id", "b1", "--resume", "--model", "other"))


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--model", "cats"], "unknown model 'cats'"),
        (["--model", "digits", "--version", "9"], "no version '9'"),
        (["--model", "digits", "--columns", "px_1,px_2"], "64 values"),
        (["--model", "digits", "--columns", "input=px_1", "--columns", "x=px_2"], "not inputs"),
        (["nope.csv", "--model", "digits"], "nope.csv: no such file"),
        (["--model", "digits", "--backfill-id", "a:b"], "invalid backfill id"),
    ],
)
def test_mistakes_exit_2_and_leave_no_checkpoint(
    context: BackfillContext,
    csv_file: Path,
    capsys: pytest.CaptureFixture[str],
    argv: list[str],
    message: str,
) -> None:
    assert main(["backfill", str(csv_file), *argv]) == 2
    assert message in capsys.readouterr().err
    directory = checkpoint_store(context).directory
    assert not directory.exists() or not list(directory.iterdir())


def test_a_file_that_does_not_fit_the_model_is_named(
    context: BackfillContext, tmp_path: Path
) -> None:
    path = tmp_path / "wide.parquet"
    pq.write_table(pa.table({"a": np.zeros(3), "b": np.zeros(3)}), path)
    with pytest.raises(UsageError, match=r"wide.parquet: cannot map the file's 2 columns"):
        plan_files(context, args(str(path), "--model", "digits"))

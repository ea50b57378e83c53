from collections.abc import Collection

import pytest

from stages.dlq import DOWNSTREAM_REASONS, PIPELINE_REASONS, DlqBudget
from stages.errors import DlqLimitExceeded
from stages.records import Rejection
from tests.helpers import record


def _rejections(reason: str, n: int) -> list[Rejection]:
    return [Rejection(record(b"", offset=i), reason, "why") for i in range(n)]


def _budget(
    counted: Collection[str] = DOWNSTREAM_REASONS, *, ratio: float = 0.5, window: int = 100
) -> DlqBudget:
    return DlqBudget(
        stage="s", counted_reasons=counted, max_ratio=ratio, window=window, min_records=10
    )


def test_a_broken_model_stops_the_stage() -> None:
    budget = DlqBudget(
        stage="infer",
        counted_reasons=DOWNSTREAM_REASONS,
        max_ratio=0.5,
        window=100,
        min_records=20,
    )
    budget.observe(10, [])
    budget.observe(10, _rejections("inference_error", 10))  # 10 of 20: at the limit, not over
    with pytest.raises(DlqLimitExceeded, match=r"infer: 16 of the last 30 records failed.*why"):
        budget.observe(10, _rejections("inference_error", 6))


@pytest.mark.parametrize("reason", ["malformed", "unknown_model", "expired", "too_large"])
def test_client_errors_at_the_first_stage_never_count(reason: str) -> None:
    budget = _budget(PIPELINE_REASONS, ratio=0.05)
    for _ in range(10):
        budget.observe(10, _rejections(reason, 10))
    with pytest.raises(DlqLimitExceeded):  # while pipeline faults there do
        budget.observe(10, _rejections("stage_error", 10))


@pytest.mark.parametrize("reason", ["malformed", "too_large", "stage_error"])
def test_after_the_first_stage_bad_input_is_a_pipeline_fault(reason: str) -> None:
    with pytest.raises(DlqLimitExceeded):
        _budget().observe(10, _rejections(reason, 10))


def test_only_the_reasons_it_is_told_count() -> None:
    budget = _budget({"inference_error"}, ratio=0.4)
    budget.observe(10, _rejections("stage_error", 10))
    with pytest.raises(DlqLimitExceeded):
        budget.observe(10, _rejections("inference_error", 10))


def test_old_batches_leave_the_window() -> None:
    budget = DlqBudget(
        stage="s", counted_reasons=DOWNSTREAM_REASONS, max_ratio=0.5, window=20, min_records=20
    )
    budget.observe(10, [])
    budget.observe(10, [])
    budget.observe(10, _rejections("inference_error", 10))  # 10 of the last 20: not over
    # The window now forgets the second healthy batch: 11 of the last 20 fail. A budget that
    # kept every batch would see 11 of 40 and let the stage run on.
    with pytest.raises(DlqLimitExceeded, match="11 of the last 20 records"):
        budget.observe(10, _rejections("inference_error", 1))

import pytest

from stages.dlq import DlqBudget
from stages.errors import DlqLimitExceeded
from stages.records import Rejection
from tests.helpers import record


def _rejections(reason: str, n: int) -> list[Rejection]:
    return [Rejection(record(b"", offset=i), reason, "why") for i in range(n)]


def test_a_broken_model_stops_the_infer_stage() -> None:
    budget = DlqBudget(stage="infer", max_ratio=0.5, window=100, min_records=20)
    budget.observe(10, [])
    budget.observe(10, _rejections("inference_error", 10))  # 10 of 20: at the limit, not over
    with pytest.raises(DlqLimitExceeded, match=r"16 of the last 30 records failed.*why"):
        budget.observe(10, _rejections("inference_error", 6))


def test_client_errors_at_validate_never_count() -> None:
    budget = DlqBudget(stage="validate", max_ratio=0.1, window=100, min_records=10)
    for _ in range(10):
        budget.observe(10, _rejections("malformed", 10) + _rejections("unknown_model", 0))


def test_malformed_after_validation_is_a_pipeline_fault() -> None:
    budget = DlqBudget(stage="persist", max_ratio=0.5, window=100, min_records=10)
    with pytest.raises(DlqLimitExceeded):
        budget.observe(10, _rejections("malformed", 10))


def test_old_batches_leave_the_window() -> None:
    budget = DlqBudget(stage="infer", max_ratio=0.5, window=20, min_records=10)
    budget.observe(10, _rejections("inference_error", 4))
    for _ in range(5):
        budget.observe(10, _rejections("inference_error", 1))  # 4 then 1 per 10 forgotten

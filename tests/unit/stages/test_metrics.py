"""stages/metrics.py: what each call records, the lag read from cached watermarks, and the
committer and infer stage reporting through the interface (no broker)."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from confluent_kafka import KafkaError, TopicPartition
from prometheus_client import CollectorRegistry

from schemas import Codec, ValidatedRequestV1, tensor_from_array
from stages.committers import TransactionalCommitter
from stages.infer import InferStage
from stages.metrics import AssignmentGauges, NullMetrics, PrometheusStageMetrics, partition_lags
from stages.models import ModelRegistry
from stages.records import Record
from tests.helpers import MODELS
from tests.unit.stages.test_committers import OFFSETS, OUT, Consumer, Factory, error


def metrics(stage: str = "infer") -> tuple[PrometheusStageMetrics, CollectorRegistry]:
    registry = CollectorRegistry()
    return PrometheusStageMetrics(stage=stage, registry=registry), registry


def lag(registry: CollectorRegistry, partition: int) -> float | None:
    labels = {"stage": "infer", "topic": "t", "partition": str(partition)}
    return registry.get_sample_value("streaminfer_consumer_lag_records", labels)


def test_assignment_reports_lag_per_partition_and_drops_revoked_ones() -> None:
    m, registry = metrics()
    m.assignment(lags={("t", 0): 5, ("t", 1): 0}, paused=1)
    assert (lag(registry, 0), lag(registry, 1)) == (5, 0)
    assert registry.get_sample_value("streaminfer_paused_partitions", {"stage": "infer"}) == 1
    m.assignment(lags={("t", 1): 3}, paused=0)
    assert (lag(registry, 0), lag(registry, 1)) == (None, 3)


class WatermarkConsumer:
    """Positions and cached watermarks, as librdkafka reports them."""

    def __init__(self, positions: dict[int, int], highs: dict[int, int]) -> None:
        self.positions = positions
        self.highs = highs
        self.cached: list[bool] = []

    def position(self, tps: list[TopicPartition]) -> list[TopicPartition]:
        return [TopicPartition(tp.topic, tp.partition, self.positions[tp.partition]) for tp in tps]

    def get_watermark_offsets(self, tp: TopicPartition, cached: bool) -> tuple[int, int]:
        self.cached.append(cached)
        return 0, self.highs[tp.partition]


def test_lag_is_high_watermark_minus_position_and_unknown_is_left_out() -> None:
    # partition 2: nothing consumed yet (OFFSET_INVALID); partition 3: no fetch response yet
    consumer = WatermarkConsumer({0: 10, 1: 7, 2: -1001, 3: 4}, {0: 25, 1: 7, 2: 9, 3: -1001})
    lags = partition_lags(consumer, [("t", p) for p in range(4)])  # type: ignore[arg-type]
    assert lags == {("t", 0): 15, ("t", 1): 0}
    assert all(consumer.cached)  # never a broker round trip


def test_assignment_gauges_sample_at_most_once_per_interval() -> None:
    now = [0.0]
    consumer = WatermarkConsumer({0: 1}, {0: 4})
    m, registry = metrics()
    gauges = AssignmentGauges(consumer, m, interval_s=1.0, clock=lambda: now[0])  # type: ignore[arg-type]
    gauges.sample({("t", 0)}, paused=0)
    consumer.highs[0] = 9
    gauges.sample({("t", 0)}, paused=0)
    assert lag(registry, 0) == 3
    now[0] = 1.5
    gauges.sample({("t", 0)}, paused=0)
    assert lag(registry, 0) == 8
    idle = AssignmentGauges(consumer, NullMetrics())  # type: ignore[arg-type]
    calls = len(consumer.cached)
    idle.sample({("t", 0)}, paused=0)
    assert len(consumer.cached) == calls  # nothing to report to: nothing read


def test_redis_health_exists_only_where_redis_is_used() -> None:
    m, registry = metrics("validate")
    assert registry.get_sample_value("streaminfer_redis_up", {"stage": "validate"}) is None
    m, registry = metrics("persist")
    m.redis_command(command="pipeline", seconds=0.002, ok=True)
    assert registry.get_sample_value("streaminfer_redis_up", {"stage": "persist"}) == 1
    m.redis_command(command="pipeline", seconds=5.0, ok=False)
    assert registry.get_sample_value("streaminfer_redis_up", {"stage": "persist"}) == 0
    labels = {"stage": "persist", "command": "pipeline"}
    assert registry.get_sample_value("streaminfer_redis_errors_total", labels) == 1
    assert registry.get_sample_value("streaminfer_redis_command_seconds_count", labels) == 2


def test_backoff_counts_pauses_and_their_seconds() -> None:
    m, registry = metrics()
    m.backoff(0.5)
    m.backoff(1.0)
    assert registry.get_sample_value("streaminfer_backoffs_total", {"stage": "infer"}) == 2
    assert registry.get_sample_value("streaminfer_backoff_seconds_total", {"stage": "infer"}) == 1.5


def transactional(factory: Factory, m: PrometheusStageMetrics) -> TransactionalCommitter:
    return TransactionalCommitter(
        producer_factory=factory,  # type: ignore[arg-type]
        consumer=Consumer(),  # type: ignore[arg-type]
        max_records=100,
        max_interval_s=60.0,
        timeout_s=1.0,
        metrics=m,
    )


def test_the_transactional_committer_times_commits_and_counts_aborts() -> None:
    m, registry = metrics()
    factory = Factory({"commit_transaction": [error(abortable=True)]})
    committer = transactional(factory, m)
    committer.publish([OUT], OFFSETS)
    with pytest.raises(Exception, match="test"):
        committer.commit()
    committer.publish([OUT], OFFSETS)
    committer.commit()
    stage = {"stage": "infer"}
    assert registry.get_sample_value("streaminfer_transaction_aborts_total", stage) == 1
    assert registry.get_sample_value("streaminfer_transaction_commit_seconds_count", stage) == 1


def test_a_fatal_error_counts_the_lost_transaction_as_aborted() -> None:
    m, registry = metrics()
    fenced = error(KafkaError._FENCED, fatal=True)
    factory = Factory({"send_offsets_to_transaction": [fenced]})
    committer = transactional(factory, m)
    committer.publish([OUT], OFFSETS)
    with pytest.raises(Exception, match="test"):
        committer.commit()
    assert (
        registry.get_sample_value("streaminfer_transaction_aborts_total", {"stage": "infer"}) == 1
    )


def validated(i: int, version: str) -> Record:
    x = np.zeros(64, dtype=np.float32)
    request = ValidatedRequestV1(
        id=f"r{i}",
        model="digits",
        model_version=version,
        inputs={"input": tensor_from_array(x)},
        created_at=1.0,
        validated_at=1.0,
    )
    return Record(
        topic="v", partition=0, offset=i, key=None, value=Codec(ValidatedRequestV1).encode(request)
    )


def test_infer_reports_requests_and_runs_per_model_version() -> None:
    m, registry = metrics()
    registry_ = ModelRegistry(root=MODELS)
    stage = InferStage(registry=registry_, output_topic="results", metrics=m)
    version = registry_.spec("digits").default_version
    outcome = stage.process([validated(i, version) for i in range(5)])
    assert len(outcome.outputs) == 5
    labels = {"model": "digits", "version": version}
    get: Any = registry.get_sample_value
    assert get("streaminfer_model_requests_total", labels) == 5
    assert get("streaminfer_model_runs_total", labels) == 1
    assert get("streaminfer_model_compute_seconds_count", labels) == 1
    assert get("streaminfer_model_queue_seconds_sum", labels) >= 0

"""``streaminfer status`` against the real broker and Redis."""

from __future__ import annotations

import pytest

from schemas import Headers
from streaminfer.kafka import make_producer
from streaminfer.settings import Settings
from streaminfer.status import collect

pytestmark = pytest.mark.integration


def test_a_snapshot_sees_health_every_stage_and_a_fresh_dead_letter(settings: Settings) -> None:
    producer = make_producer(settings)
    headers = [(Headers.DLQ_STAGE, b"validate"), (Headers.DLQ_REASON, b"unknown_model")]
    for _ in range(3):
        producer.produce(settings.topics.dlq, key=b"k", value=b"v", headers=headers)
    assert producer.flush(30) == 0

    snapshot = collect(settings, interval_s=0.2)

    assert [h.name for h in snapshot.health if h.ok] == ["kafka", "redis"]
    assert [s.name for s in snapshot.stages] == ["validate", "infer", "persist"]
    assert all(s.lag == 0 and s.members == [] for s in snapshot.stages)  # nothing consumes
    assert snapshot.dead_letters == {("validate", "unknown_model"): 3}
    assert snapshot.notes == []

"""validate serves live requests before backfill ones while live has a backlog."""

from __future__ import annotations

import pytest

from ingest.producer import RequestProducer
from schemas import Codec, ValidatedRequestV1
from streaminfer.kafka import make_producer
from streaminfer.settings import Settings
from tests.fixtures import StageProcesses, read_topic
from tests.helpers import digits_request, holdout

pytestmark = pytest.mark.integration
LIVE, BULK = 5_000, 30_000


def _send(settings: Settings, topic: str, tag: str, count: int) -> None:
    features, _ = holdout()
    sender = RequestProducer(producer=make_producer(settings), topic=topic)
    for i in range(count):
        sender.send(digits_request(features[i % len(features)], request_id=f"{tag}-{i}"))
    assert sender.flush() == 0


def test_backfill_waits_while_live_requests_have_a_backlog(
    settings: Settings, stages: StageProcesses, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("STREAMINFER_BATCH_SIZE", "500")
    # Both backlogs exist before validate starts. Without priority, fetches interleave the
    # two topics: measured here, 24,429 of the 30,000 backfill requests were validated before
    # the last live one. With it, only what was fetched before the first lag reading (a few
    # batches) goes first.
    _send(settings, settings.topics.requests_backfill, "bulk", BULK)
    _send(settings, settings.topics.requests, "live", LIVE)
    stages.start("validate")

    codec = Codec(ValidatedRequestV1)
    validated = [
        codec.decode(m.value() or b"")
        for m in read_topic(settings, settings.topics.validated, count=LIVE + BULK)
    ]
    last_live = max(v.validated_at for v in validated if v.id.startswith("live-"))
    bulk_before = sum(
        1 for v in validated if v.id.startswith("bulk-") and v.validated_at < last_live
    )
    assert bulk_before < LIVE // 2, f"{bulk_before} backfill requests went before live ones"

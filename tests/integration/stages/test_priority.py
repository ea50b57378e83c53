"""validate serves live requests before backfill ones, and lets backfill in only as fast as
infer and persist take it."""

from __future__ import annotations

import time
import uuid

import pytest

from schemas import Codec, StoredV1, ValidatedRequestV1
from streaminfer.kafka import make_consumer
from streaminfer.settings import Settings
from streaminfer.wiring import downstream_backlog
from tests.fixtures import Load, StageProcesses, read_topic, send_digits

pytestmark = pytest.mark.integration
LIVE, BULK = 5_000, 30_000


def test_backfill_waits_while_live_requests_have_a_backlog(
    settings: Settings, stages: StageProcesses, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("STREAMINFER_BATCH_SIZE", "500")
    # validate alone here: the downstream rule (no infer to take the records) is tested below.
    monkeypatch.setenv("STREAMINFER_PRIORITY_MAX_DOWNSTREAM", "0")
    # Both backlogs exist before validate starts. Without priority, fetches interleave the
    # two topics: measured here, 24,429 of the 30,000 backfill requests were validated before
    # the last live one. With it, only what was fetched before the first lag reading (a few
    # batches) goes first.
    send_digits(settings, settings.topics.requests_backfill, [f"bulk-{i}" for i in range(BULK)])
    send_digits(settings, settings.topics.requests, [f"live-{i}" for i in range(LIVE)])
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


def test_backfill_enters_only_as_fast_as_downstream_takes_it(
    settings: Settings, stages: StageProcesses, monkeypatch: pytest.MonkeyPatch
) -> None:
    limit, batch, bulk = 300, 200, 20_000
    monkeypatch.setenv("STREAMINFER_PRIORITY_MAX_DOWNSTREAM", str(limit))
    monkeypatch.setenv("STREAMINFER_PRIORITY_MAX_DOWNSTREAM_IDLE", str(limit))
    monkeypatch.setenv("STREAMINFER_BATCH_SIZE", str(batch))
    send_digits(settings, settings.topics.requests_backfill, [f"bulk-{i}" for i in range(bulk)])
    for name in ("infer", "persist", "validate"):
        stages.start(name)
    live = Load(settings, count=100_000, rate=100, tag="live").start()  # stopped below
    # The test reads the downstream backlog the way validate does.
    probe = downstream_backlog(settings, interval_s=0.05)
    samples: list[int] = []
    stored = 0
    codec = Codec(StoredV1)
    reader = make_consumer(settings, group_id=f"reader-{uuid.uuid4().hex}")
    reader.subscribe([settings.topics.stored])
    deadline = time.monotonic() + 240
    while stored < bulk and time.monotonic() < deadline:
        samples.append(probe.read())
        for m in reader.consume(1000, timeout=0.05):
            if m.error() is None and codec.decode(m.value() or b"").id.startswith("bulk-"):
                stored += 1
    reader.close()
    probe.close()
    live.stop()
    live.join()
    assert stored == bulk, f"{stored} of {bulk} backfill requests stored"
    # Without the rule validate forwards the backfill at its own pace and thousands wait
    # downstream. With it: the limit, plus the batch that crossed it and one more (records
    # validate took before a reading but had not produced yet), plus live requests.
    assert max(samples) <= limit + 2 * batch + 200, f"downstream backlog reached {max(samples)}"
    assert len(samples) > 20, "too few readings to say anything"

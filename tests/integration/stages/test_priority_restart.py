"""A backfill starts on a restarted validate whatever the live topic's history (issue 11,
item 9).

After a restart, a live partition that gets no new record has no consumer position
(librdkafka reports none until a record is consumed from it). The live-first gate used to
count such a partition from its log start, so a consumed history looked like a live
backlog for as long as no live request came to that partition: the backfill stayed paused
for good. These tests restart validate with history on the live topic, then backfill:
with no live traffic at all, and with a trickle on one live partition only."""

from __future__ import annotations

import threading

import pytest
from confluent_kafka import Consumer

from kafkaio.offsets import group_backlog
from kafkaio.produce import request_headers
from schemas import Codec, RequestV1, ValidatedRequestV1
from streaminfer.kafka import make_consumer, make_producer
from streaminfer.settings import Settings
from tests.fixtures import StageProcesses, read_topic, send_digits, wait_until
from tests.helpers import digits_request, holdout

pytestmark = pytest.mark.integration
HISTORY, BULK = 2_000, 1_000


def _validate_offsets(settings: Settings) -> Consumer:
    """Reads validate's committed offsets (never subscribed: does not join its group)."""
    return make_consumer(settings, group_id=settings.group_id("validate"))


def _wait_consumed(settings: Settings, reader: Consumer, topic: str, timeout_s: float) -> None:
    def done() -> bool:
        return sum(group_backlog(reader, topic).values()) == 0

    wait_until(done, timeout_s, f"validate committed everything on {topic}")


def _history_consumed_then_restart(settings: Settings, stages: StageProcesses) -> Consumer:
    """Live history on every partition, consumed and committed; validate restarted."""
    send_digits(settings, settings.topics.requests, [f"history-{i}" for i in range(HISTORY)])
    stages.start("validate")
    reader = _validate_offsets(settings)
    _wait_consumed(settings, reader, settings.topics.requests, 60)
    assert stages.terminate("validate") == 0
    stages.start("validate")
    return reader


class Trickle:
    """Live requests to ONE partition of the live topic, ``rate`` per second, until stopped."""

    def __init__(self, settings: Settings, *, partition: int, rate: float) -> None:
        self.settings = settings
        self.partition = partition
        self.rate = rate
        self.sent: list[str] = []
        self.undelivered = -1
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> Trickle:
        self._thread.start()
        return self

    def _run(self) -> None:
        features, _ = holdout()
        producer = make_producer(self.settings)
        codec = Codec(RequestV1)
        while not self._stop.wait(1 / self.rate):
            request = digits_request(features[len(self.sent) % len(features)])
            producer.produce(
                self.settings.topics.requests,
                value=codec.encode(request),
                key=request.id.encode(),
                headers=request_headers(),
                partition=self.partition,
            )
            producer.poll(0)
            self.sent.append(request.id)
        self.undelivered = producer.flush(30)

    def stop(self) -> list[str]:
        """Stop sending; the ids sent, every one acknowledged by Kafka."""
        self._stop.set()
        self._thread.join(60)
        assert self.undelivered == 0, f"{self.undelivered} live requests not acknowledged"
        return self.sent


def _validated_ids(settings: Settings, count: int) -> set[str]:
    codec = Codec(ValidatedRequestV1)
    messages = read_topic(settings, settings.topics.validated, count=count, timeout_s=90)
    return {codec.decode(m.value() or b"").id for m in messages}


@pytest.fixture(autouse=True)
def _live_rule_only(monkeypatch: pytest.MonkeyPatch) -> None:
    # validate alone: the downstream rule (no infer or persist to take the records) is
    # tested in test_priority.py; here only the live rule decides.
    monkeypatch.setenv("STREAMINFER_PRIORITY_MAX_DOWNSTREAM", "0")


def test_backfill_flows_after_a_restart_with_a_consumed_live_history(
    settings: Settings, stages: StageProcesses
) -> None:
    reader = _history_consumed_then_restart(settings, stages)
    send_digits(settings, settings.topics.requests_backfill, [f"bulk-{i}" for i in range(BULK)])
    _wait_consumed(settings, reader, settings.topics.requests_backfill, 90)
    reader.close()
    bulk = {f"bulk-{i}" for i in range(BULK)}
    assert bulk <= _validated_ids(settings, HISTORY + BULK)


def test_backfill_flows_with_a_live_trickle_on_one_partition_only(
    settings: Settings, stages: StageProcesses
) -> None:
    trickle = Trickle(settings, partition=0, rate=20).start()
    reader = _history_consumed_then_restart(settings, stages)
    send_digits(settings, settings.topics.requests_backfill, [f"bulk-{i}" for i in range(BULK)])
    _wait_consumed(settings, reader, settings.topics.requests_backfill, 90)
    live = trickle.stop()
    _wait_consumed(settings, reader, settings.topics.requests, 60)  # live served as well
    reader.close()
    ids = _validated_ids(settings, HISTORY + BULK + len(live))
    assert {f"bulk-{i}" for i in range(BULK)} <= ids
    assert set(live) <= ids and len(live) > 0

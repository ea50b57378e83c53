"""What a backfill may send: the pipeline's record limit and the per-row byte limit come from
the settings, a request over the limit is a ``too_large`` reject (never a failed run), and a
replayed request keeps its original tenant (no broker: the Kafka clients are stand-ins that
keep librdkafka's contracts)."""

from __future__ import annotations

import dataclasses
import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from confluent_kafka import TopicPartition

from backfill.checkpoint import Checkpoint, CheckpointStore, SourceState, read_rejects
from backfill.context import BackfillContext
from backfill.convert import Reject
from backfill.engine import Item, RunOutcome, Source
from backfill.plan import plan_files, start_run
from backfill.replay import ReplaySource, window_sources
from schemas import Codec, Headers, RequestV1, Tensor
from schemas.validation import PIPELINE_MARGIN_BYTES, request_size_limit
from streaminfer.cli import build_parser
from streaminfer.contexts import backfill_context
from streaminfer.settings import Settings
from tests.unit.backfill import engine_run
from tests.unit.backfill.engine_run import AckingProducer

GOOD = json.dumps([1.0] * 64)  # one row for the digits model


class FakeMessage:
    """A consumed record; ``headers()`` raises like confluent-kafka's on a non-UTF-8 name."""

    def __init__(self, offset: int, value: bytes, headers: list[tuple[str, bytes]] | None) -> None:
        self._offset, self._value, self._headers = offset, value, headers

    def offset(self) -> int:
        return self._offset

    def partition(self) -> int:
        return 0

    def value(self) -> bytes:
        return self._value

    def error(self) -> None:
        return None

    def headers(self) -> list[tuple[str, bytes]] | None:
        if self._headers is None:
            raise UnicodeDecodeError("utf-8", b"\xff", 0, 1, "invalid start byte")
        return self._headers


class PartitionConsumer:
    """One partition holding ``messages`` at offsets 0, 1, ...: what the bounded readers ask
    of a consumer (metadata, watermarks, time index, assign and consume)."""

    def __init__(self, topic: str, messages: list[FakeMessage]) -> None:
        self.topic = topic
        self.messages = messages
        self._position: int | None = None

    def list_topics(self, topic: str | None = None, timeout: float = -1) -> Any:
        partitions = {0: None} if self.messages else {}
        return SimpleNamespace(
            topics={self.topic: SimpleNamespace(error=None, partitions=partitions)}
        )

    def get_watermark_offsets(self, _tp: TopicPartition, timeout: float = -1) -> tuple[int, int]:
        return 0, len(self.messages)

    def offsets_for_times(self, wanted: list[TopicPartition], timeout: float = -1) -> Any:
        return [TopicPartition(tp.topic, tp.partition, 0) for tp in wanted]

    def assign(self, tps: list[TopicPartition]) -> None:
        self._position = tps[0].offset if tps else None

    def unassign(self) -> None:
        self._position = None

    def consume(self, num_messages: int = 1, timeout: float = -1) -> list[FakeMessage]:
        if self._position is None:
            return []
        batch = self.messages[self._position : self._position + num_messages]
        self._position += len(batch)
        return batch

    def position(self, tps: list[TopicPartition]) -> list[TopicPartition]:
        return tps

    def close(self) -> None:
        pass


def new_checkpoint(kind: str, sources: list[SourceState]) -> Checkpoint:
    now = time.time()
    return Checkpoint(
        backfill_id="bf",
        kind="files" if kind == "files" else "replay",
        model="m",
        created_at=now,
        updated_at=now,
        sources=sources,
    )


def run_engine(
    tmp_path: Path, source: Source, producer: AckingProducer, *, max_request_bytes: int
) -> tuple[RunOutcome, Checkpoint, CheckpointStore]:
    store = CheckpointStore(tmp_path / "checkpoints")
    checkpoint = new_checkpoint(source.state.kind, [source.state])
    outcome = engine_run.run_engine(
        producer, store, checkpoint, [source], max_request_bytes=max_request_bytes
    )
    return outcome, checkpoint, store


# --- the record limit ---------------------------------------------------------------------


class SizedRows:
    """Rows 1..10; the ones in ``big`` carry a 5,000-byte tensor, the others 10 bytes."""

    def __init__(self, big: set[int]) -> None:
        self.big = big
        self.state = SourceState(
            name="sized.jsonl", kind="file", key="k", format="jsonl", fingerprint="f"
        )

    def items(self, *, after_row: int) -> Iterator[Item]:
        for row in range(after_row + 1, 11):
            size = 5000 if row in self.big else 10
            tensor = Tensor(dtype="uint8", shape=[size], data=bytes(size))
            yield row, RequestV1(id=f"r{row}", model="m", inputs={"x": tensor}, created_at=0.0)


def test_a_request_over_the_pipeline_limit_is_a_reject_and_the_run_goes_on(
    tmp_path: Path,
) -> None:
    producer = AckingProducer()
    limit = request_size_limit(PIPELINE_MARGIN_BYTES + 1000)  # ingest's limit, Kafka at +1000
    outcome, checkpoint, store = run_engine(
        tmp_path, SizedRows({3, 7}), producer, max_request_bytes=limit
    )
    assert outcome.status == "done" and checkpoint.complete
    assert [r["key"] for r in producer.records] == [
        f"r{n}".encode() for n in (1, 2, 4, 5, 6, 8, 9, 10)
    ]
    assert (checkpoint.sent, checkpoint.rejected) == (8, 2)
    lines = list(read_rejects(store.rejects_path("bf")))
    assert [(r.source, r.row, r.reason) for r in lines] == [
        ("sized.jsonl", 3, "too_large"),
        ("sized.jsonl", 7, "too_large"),
    ]
    assert str(limit) in lines[0].detail


@pytest.fixture()
def environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    monkeypatch.setenv("STREAMINFER_BACKFILL_CHECKPOINT_DIR", str(tmp_path / "checkpoints"))
    monkeypatch.setenv("KAFKA_BOOTSTRAP_SERVERS", "127.0.0.1:1")  # nothing may reach Kafka
    return monkeypatch


def settings_context(producer: AckingProducer) -> BackfillContext:
    """The backfill context ``main()`` builds, with stand-in Kafka clients."""
    context = backfill_context(Settings())
    return dataclasses.replace(
        context,
        new_producer=lambda: producer,
        new_reader=lambda: PartitionConsumer(context.topics.dlq, []),
    )


def backfill_args(*argv: str) -> Any:
    return build_parser().parse_args(["backfill", *argv])


@pytest.mark.parametrize(
    ("message_max_bytes", "sent"), [(None, 5), (PIPELINE_MARGIN_BYTES + 200, 0)]
)
def test_the_kafka_record_limit_setting_bounds_a_file_backfill(
    environment: pytest.MonkeyPatch, tmp_path: Path, message_max_bytes: int | None, sent: int
) -> None:
    if message_max_bytes is not None:  # 200 bytes: less than one digits row's 256 of data
        environment.setenv("STREAMINFER_KAFKA_MESSAGE_MAX_BYTES", str(message_max_bytes))
    path = tmp_path / "rows.jsonl"
    path.write_text(f"{GOOD}\n" * 5)
    producer = AckingProducer()
    context = settings_context(producer)
    plan = plan_files(context, backfill_args(str(path), "--model", "digits", "--backfill-id", "b"))
    with start_run(context, plan, stop=threading.Event(), rate=None) as run:
        outcome = run.run(plan.sources)
    assert outcome.status == "done" and run.checkpoint.complete
    assert (run.checkpoint.sent, run.checkpoint.rejected) == (sent, 5 - sent)
    assert len(producer.records) == sent
    rejected = read_rejects(plan.store.rejects_path("b"))
    assert {(r.source, r.reason) for r in rejected} <= {(str(path.resolve()), "too_large")}
    for index in range(sent):  # a file backfill is the default tenant's: no tenant header
        assert Headers.TENANT not in producer.headers(index)


# --- the per-row byte limit ---------------------------------------------------------------


def test_the_max_row_bytes_setting_reaches_the_readers_on_resume_too(
    environment: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    environment.setenv("STREAMINFER_BACKFILL_MAX_ROW_BYTES", "2048")
    padded = json.dumps([1.0] * 64, indent=40)  # valid JSON, over 2,048 bytes on one line
    padded = padded.replace("\n", " ")
    assert len(padded) > 2048 > len(GOOD)
    path = tmp_path / "rows.jsonl"
    path.write_text(f"{GOOD}\n{padded}\n{GOOD}\n")
    context = settings_context(AckingProducer())
    assert context.max_row_bytes == 2048
    for argv in (("--model", "digits"), ("--resume",)):
        plan = plan_files(context, backfill_args(str(path), *argv, "--backfill-id", "b"))
        items = list(plan.sources[0].items(after_row=0))
        assert [row for row, _ in items] == [1, 2, 3]
        assert isinstance(items[0][1], RequestV1) and isinstance(items[2][1], RequestV1)
        reject = items[1][1]
        assert isinstance(reject, Reject) and reject.reason == "too_large"


def test_the_max_row_bytes_default_is_the_readers_default() -> None:
    from backfill.convert import MAX_CELL_BYTES

    assert Settings().backfill.max_row_bytes == MAX_CELL_BYTES


# --- replay keeps the tenant --------------------------------------------------------------


def stored(request_id: str, model: str = "m") -> bytes:
    tensor = Tensor(dtype="uint8", shape=[4], data=bytes(4))
    request = RequestV1(id=request_id, model=model, inputs={"x": tensor}, created_at=1.0)
    return Codec(RequestV1).encode(request)


def test_replay_keeps_each_original_records_tenant(tmp_path: Path) -> None:
    topic = "inference.requests"
    consumer = PartitionConsumer(
        topic,
        [
            FakeMessage(0, stored("a"), [(Headers.TENANT, b"acme")]),
            FakeMessage(1, stored("b"), []),  # no header: the default tenant
            FakeMessage(2, stored("c"), None),  # headers unreadable: tenant unknown
            FakeMessage(3, stored("d"), [("traceparent", b"x"), (Headers.TENANT, b"globex")]),
        ],
    )
    (state,) = window_sources(consumer, topic, 0, None)  # type: ignore[arg-type]
    source = ReplaySource(
        consumer=consumer,  # type: ignore[arg-type]
        topic=topic,
        state=state,
        replay_id="rp",
        model="m",
        version=None,
    )
    producer = AckingProducer()
    outcome, checkpoint, store = run_engine(tmp_path, source, producer, max_request_bytes=10_000)
    assert outcome.status == "done" and checkpoint.complete
    assert [r["key"] for r in producer.records] == [b"rp:a", b"rp:b", b"rp:d"]
    tenants = [producer.headers(i).get(Headers.TENANT) for i in range(3)]
    assert tenants == [b"acme", None, b"globex"]
    (reject,) = read_rejects(store.rejects_path("bf"))
    assert (reject.row, reject.reason) == (2, "malformed")

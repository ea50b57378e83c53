"""The fused stage: validate, infer and persist on one batch, built from the real stages (the
models of the repository, a stand-in Redis). Good requests reach results, Redis and stored
notices; a record refused at any step is dead-lettered as the consumed request, naming the
step and its reason; run by the StageRunner, the committed offsets cover every record."""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import Any, cast

import pytest
import redis

from schemas import Codec, Headers, ResultV1, StoredV1
from schemas.keys import ResultKeys
from schemas.models import ModelCatalog
from sinks.redis_store import ResultStore
from stages.dlq import dlq_output
from stages.errors import SinkUnavailable
from stages.fused import FusedStage
from stages.infer import InferStage
from stages.models import ModelRegistry
from stages.persist import PersistStage
from stages.records import BatchOutcome, Record
from stages.runtime import Stage, StageRunner
from stages.validate import ValidateStage
from tests.helpers import MODELS, REQUESTS, digits_request, holdout
from tests.unit.sinks.fakes import FakeRedis
from tests.unit.stages.test_runner import Committer, Consumer, Message

NOW = 1_700_000_000.0
DAY = 86_400.0
REQUESTS_TOPIC, BACKFILL_TOPIC = "inference.requests", "inference.requests.backfill"
RESULTS = Codec(ResultV1)
NOTICES = Codec(StoredV1)


class Pipeline:
    """The three stages the way wiring builds them, clocks apart so that a request can pass
    one step and fail the next (infer 10 s after validate, persist 200 days after)."""

    def __init__(self, *, infer_at: float = NOW + 10, persist_at: float = NOW + 200 * DAY) -> None:
        self.redis = FakeRedis()
        self.validate = ValidateStage(
            catalog=ModelCatalog(MODELS), output_topic="validated", clock=lambda: NOW
        )
        self.infer: Stage = InferStage(
            registry=ModelRegistry(root=MODELS),
            output_topic="results",
            shadow_topic="shadow",
            clock=lambda: infer_at,
        )
        store = ResultStore(client=cast(Any, self.redis), ttl_s=60, keys=ResultKeys(prefix="p."))
        self.persist = PersistStage(store=store, output_topic="stored", clock=lambda: persist_at)

    def fused(self, **kwargs: Any) -> FusedStage:
        return FusedStage(
            validate=self.validate,
            infer=self.infer,
            persist=self.persist,
            results_topic="results",
            **kwargs,
        )

    def stored_ids(self) -> set[str]:
        return {key.rsplit(":", 1)[1] for key in self.redis.values}


def request(i: int, **fields: Any) -> bytes:
    features, _ = holdout()
    fields.setdefault("created_at", NOW - 1)
    return REQUESTS.encode(
        digits_request(features[i % len(features)], request_id=f"r{i}", **fields)
    )


def consumed(
    values: Sequence[bytes], *, topic: str = REQUESTS_TOPIC, key: bytes = b"k"
) -> list[Record]:
    """Records as the runtime reads them; one key for all (the matching must keep order)."""
    headers = ((Headers.TENANT, b"acme"),)
    return [
        Record(topic=topic, partition=1, offset=100 + i, key=key, value=v, headers=headers)
        for i, v in enumerate(values)
    ]


def by_topic(outcome: BatchOutcome, topic: str) -> list[bytes]:
    return [o.value for o in outcome.outputs if o.topic == topic]


def refusals(outcome: BatchOutcome) -> list[tuple[str | None, str, int]]:
    return sorted((r.stage, r.reason, r.record.offset) for r in outcome.rejected)


def test_good_requests_become_results_stored_notices_and_redis_values() -> None:
    pipeline = Pipeline()
    batch = consumed([request(i) for i in range(20)])
    outcome = pipeline.fused().process(batch)
    assert outcome.rejected == []
    assert by_topic(outcome, "validated") == [], "intermediate outputs are never produced"
    results = [RESULTS.decode(v) for v in by_topic(outcome, "results")]
    assert [r.id for r in results] == [f"r{i}" for i in range(20)]
    notices = [NOTICES.decode(v) for v in by_topic(outcome, "stored")]
    assert [n.key for n in notices] == [f"p.result:acme:r{i}" for i in range(20)]
    assert pipeline.redis.values["p.result:acme:r3"] == by_topic(outcome, "results")[3]


def test_fused_serves_what_the_three_stages_serve_one_after_the_other() -> None:
    batch = consumed([request(i) for i in range(30)])
    split = Pipeline()
    validated = split.validate.process(batch).outputs
    as_records = [Record("validated", 0, i, o.key, o.value) for i, o in enumerate(validated)]
    expected = [RESULTS.decode(o.value) for o in split.infer.process(as_records).outputs]
    fused = [RESULTS.decode(v) for v in by_topic(Pipeline().fused().process(batch), "results")]
    assert [(r.id, r.label, r.scores) for r in fused] == [
        (r.id, r.label, r.scores) for r in expected
    ]


def test_a_refusal_at_each_step_names_the_step_its_reason_and_the_consumed_record() -> None:
    values = [
        request(0),
        b"\xc1 not msgpack",  # validate: malformed
        request(2),
        request(3, deadline=NOW + 5),  # valid at validate (NOW), expired at infer (NOW + 10)
        request(4, created_at=NOW - 200 * DAY),  # 400 days old when persist sees it
        request(5),
    ]
    batch = consumed(values)
    outcome = Pipeline().fused().process(batch)
    assert refusals(outcome) == [
        ("infer", "expired", 103),
        ("persist", "malformed", 104),
        ("validate", "malformed", 101),
    ]
    for rejection in outcome.rejected:  # the consumed record itself, not an intermediate one
        assert rejection.record in batch
        letter = dict(dlq_output(rejection, stage="fused", dlq_topic="dlq").headers)
        assert letter[Headers.DLQ_STAGE] == (rejection.stage or "").encode()
        assert letter[Headers.DLQ_SOURCE_TOPIC] == REQUESTS_TOPIC.encode()
        assert letter[Headers.DLQ_SOURCE_OFFSET] == str(rejection.record.offset).encode()
    results = {RESULTS.decode(v).id for v in by_topic(outcome, "results")}
    assert results == {"r0", "r2", "r4", "r5"}, "r4's result was produced; persist refused it"
    assert len(by_topic(outcome, "stored")) == 3


def test_results_infer_reorders_still_name_their_own_request_at_persist() -> None:
    # Versions 1, 2, 1: infer runs version 1's two together, so its results come out as
    # r0, r2, r1. The keys tell them apart: persist's refusal of r1 names r1's offset.
    old = NOW - 200 * DAY
    values = [
        request(0, model_version="1"),
        request(1, model_version="2", created_at=old),
        request(2, model_version="1"),
    ]
    batch = [
        Record(topic=REQUESTS_TOPIC, partition=0, offset=7 + i, key=f"key-{i}".encode(), value=v)
        for i, v in enumerate(values)
    ]
    outcome = Pipeline().fused().process(batch)
    assert [RESULTS.decode(v).id for v in by_topic(outcome, "results")] == ["r0", "r2", "r1"]
    assert refusals(outcome) == [("persist", "malformed", 8)]
    assert outcome.rejected[0].record == batch[1]


class RaisesOn:
    """A step that raises for any batch holding a record whose value contains ``marker``."""

    def __init__(self, stage: Stage, marker: bytes) -> None:
        self.name = stage.name
        self._stage = stage
        self._marker = marker

    def process(self, batch: Sequence[Record]) -> BatchOutcome:
        if any(self._marker in r.value for r in batch):
            raise RuntimeError("boom")
        return self._stage.process(batch)


def test_a_step_that_raises_dead_letters_only_the_record_that_raises() -> None:
    pipeline = Pipeline()
    pipeline.infer = RaisesOn(pipeline.infer, b"poison")
    values = [request(0), request(1, attributes={"note": "poison"}), request(2)]
    outcome = pipeline.fused().process(consumed(values))
    assert refusals(outcome) == [("infer", "stage_error", 101)]
    assert pipeline.stored_ids() == {"r0", "r2"}


def test_an_oversized_result_is_dead_lettered_by_infer_and_never_stored() -> None:
    pipeline = Pipeline()
    outcome = pipeline.fused(max_record_bytes=200).process(consumed([request(0), request(1)]))
    assert refusals(outcome) == [("infer", "too_large", 100), ("infer", "too_large", 101)]
    assert outcome.outputs == [] and pipeline.stored_ids() == set()


def test_redis_down_fails_the_batch_for_the_runtime_to_retry() -> None:
    pipeline = Pipeline()
    pipeline.redis.failure = redis.exceptions.ConnectionError("refused")
    with pytest.raises(SinkUnavailable):
        pipeline.fused().process(consumed([request(0)]))


def test_run_by_the_runner_every_offset_is_committed_and_refusals_are_dead_lettered() -> None:
    live = [request(i) for i in range(7)] + [b"junk", request(8, deadline=NOW + 5)]
    bulk = [request(20 + i) for i in range(5)]
    logs = {
        (REQUESTS_TOPIC, 0): [Message(REQUESTS_TOPIC, 0, i, v) for i, v in enumerate(live)],
        (BACKFILL_TOPIC, 0): [Message(BACKFILL_TOPIC, 0, i, v) for i, v in enumerate(bulk)],
    }
    consumer = Consumer(logs)
    committer = Committer(consumer, transactional=True)
    pipeline = Pipeline()
    runner = StageRunner(
        stage=pipeline.fused(),
        consumer=consumer,  # type: ignore[arg-type]
        committer=committer,
        input_topics=[REQUESTS_TOPIC, BACKFILL_TOPIC],
        dlq_topic="dlq",
        batch_size=4,
        batch_timeout_s=0.0,
    )
    consumer.subscribe(
        [], on_assign=runner._on_assign, on_revoke=runner._on_revoke, on_lost=runner._on_lost
    )
    consumer.assign(list(logs))
    while runner.run_once():
        pass
    runner.run(_stopped())  # finishes: commits what is pending and closes
    assert consumer.committed_offsets == {(REQUESTS_TOPIC, 0): 9, (BACKFILL_TOPIC, 0): 5}
    published = committer.published
    assert sorted(RESULTS.decode(o.value).id for o in published if o.topic == "results") == sorted(
        [f"r{i}" for i in range(7)] + [f"r{20 + i}" for i in range(5)]
    )
    assert sum(o.topic == "stored" for o in published) == 12
    dead = [dict(o.headers) for o in published if o.topic == "dlq"]
    assert sorted((d[Headers.DLQ_STAGE], d[Headers.DLQ_SOURCE_OFFSET]) for d in dead) == [
        (b"infer", b"8"),
        (b"validate", b"7"),
    ]
    assert {o.value for o in published if o.topic == "dlq"} == {b"junk", live[8]}


def _stopped() -> threading.Event:
    stop = threading.Event()
    stop.set()
    return stop

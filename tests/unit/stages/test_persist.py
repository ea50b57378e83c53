"""persist: results stored per tenant, and Redis running out of memory is a wait, not a loss."""

from __future__ import annotations

import logging
import math
from typing import Any, cast

import msgspec
import numpy as np
import pytest
import redis

from schemas import Codec, Headers, ResultV1, StoredV1, Tensor, tensor_from_array
from schemas.keys import ResultKeys, ready_ids
from sinks.redis_store import ResultStore
from stages.errors import SinkUnavailable
from stages.metrics import NullMetrics
from stages.persist import OOM_RETRY_AFTER_S, PersistStage, is_out_of_memory
from stages.records import Record
from tests.unit.sinks.fakes import FakeRedis

OOM = "OOM command not allowed when used memory > 'maxmemory'."


class CountingMetrics(NullMetrics):
    def __init__(self) -> None:
        self.ooms = 0

    def redis_oom(self) -> None:
        self.ooms += 1


def result_record(request_id: str, offset: int, tenant: bytes | None) -> Record:
    result = ResultV1(
        id=request_id,
        model="digits",
        model_version="1",
        status="ok",
        outputs={"p": tensor_from_array(np.array([1.0], dtype=np.float32))},
        created_at=1.0,
    )
    headers = ((Headers.TENANT, tenant),) if tenant is not None else ()
    return Record(
        topic="inference.results",
        partition=0,
        offset=offset,
        key=request_id.encode(),
        value=Codec(ResultV1).encode(result),
        headers=headers,
    )


def persist_on(client: FakeRedis, metrics: CountingMetrics | None = None) -> PersistStage:
    store = ResultStore(client=cast(Any, client), ttl_s=60, keys=ResultKeys(prefix="p."))
    return PersistStage(
        store=store,
        output_topic="inference.stored",
        default_tenant="trusted",
        metrics=metrics,
        clock=lambda: 2.0,
    )


def test_each_result_is_stored_under_its_records_tenant() -> None:
    client = FakeRedis()
    batch = [result_record("r1", 0, b"acme"), result_record("r1", 1, None)]
    outcome = persist_on(client).process(batch)
    assert set(client.values) == {"p.result:acme:r1", "p.result:trusted:r1"}
    notices = [Codec(StoredV1).decode(o.value) for o in outcome.outputs]
    assert [n.key for n in notices] == ["p.result:acme:r1", "p.result:trusted:r1"]
    # The stored notice keeps the tenant header for whoever reads inference.stored.
    assert (Headers.TENANT, b"acme") in outcome.outputs[0].headers
    assert all(name != Headers.TENANT for name, _ in outcome.outputs[1].headers)


def test_a_batch_is_announced_once_per_tenant_after_its_writes() -> None:
    client = FakeRedis()
    batch = [
        result_record("r1", 0, b"acme"),
        result_record("r2", 1, None),
        broken_record(2, created_at=math.nan),  # refused: neither stored nor announced
        result_record("r3", 3, b"acme"),
    ]
    outcome = persist_on(client).process(batch)
    assert len(outcome.rejected) == 1 and len(outcome.outputs) == 3
    names = [c[0] for c in client.commands]
    assert names == ["set", "set", "set", "publish", "publish"]
    announced = {c[1]: ready_ids(c[2]) for c in client.commands if c[0] == "publish"}
    assert announced == {"p.results-ready:acme": ["r1", "r3"], "p.results-ready:trusted": ["r2"]}


@pytest.mark.parametrize(
    "failure",
    [
        redis.exceptions.OutOfMemoryError(OOM),
        redis.exceptions.ResponseError(OOM),
        # What a pipeline raises: redis-py prefixes the server's answer with the command.
        redis.exceptions.ResponseError(
            f"Command # 1 (SET p.result:a:r1 ...) of pipeline caused error: {OOM}"
        ),
    ],
)
def test_redis_out_of_memory_is_transient_counted_and_explained(
    failure: redis.RedisError, caplog: pytest.LogCaptureFixture
) -> None:
    client = FakeRedis()
    client.failure = failure
    metrics = CountingMetrics()
    persist = persist_on(client, metrics)
    with caplog.at_level(logging.ERROR), pytest.raises(SinkUnavailable) as caught:
        persist.process([result_record("r1", 0, b"acme")])
    assert caught.value.retry_after_s == OOM_RETRY_AFTER_S
    assert metrics.ooms == 1
    assert "maxmemory" in caplog.text and "eviction policy" in caplog.text
    # Nothing half-written is kept: the rewound batch is added again on the retry.
    client.failure = None
    outcome = persist.process([result_record("r1", 0, b"acme")])
    assert len(outcome.outputs) == 1 and list(client.values) == ["p.result:acme:r1"]


def test_other_redis_errors_are_transient_but_not_out_of_memory() -> None:
    client = FakeRedis()
    client.failure = redis.exceptions.ResponseError("WRONGTYPE Operation against a key")
    metrics = CountingMetrics()
    with pytest.raises(SinkUnavailable) as caught:
        persist_on(client, metrics).process([result_record("r1", 0, None)])
    assert caught.value.retry_after_s < OOM_RETRY_AFTER_S and metrics.ooms == 0
    assert not is_out_of_memory(redis.ConnectionError("OOM-looking text, but no answer"))


class LatencyMetrics(NullMetrics):
    def __init__(self) -> None:
        self.latencies: list[float] = []

    def end_to_end(self, seconds: float) -> None:
        self.latencies.append(seconds)


def broken_record(offset: int, *, created_at: float = 1.0, output: Tensor | None = None) -> Record:
    """A result that decodes as ResultV1 (types right) but must not be stored."""
    good = Codec(ResultV1).decode(result_record("bad", offset, None).value)
    outputs = good.outputs if output is None else {"p": output}
    broken = msgspec.structs.replace(good, created_at=created_at, outputs=outputs)
    return Record("inference.results", 0, offset, b"bad", Codec(ResultV1).encode(broken))


@pytest.mark.parametrize(
    ("broken", "detail"),
    [
        (broken_record(1, output=Tensor("float32", [64], b"\x00")), "data has 1 bytes"),
        (broken_record(1, output=Tensor("float32", [0, 2**62], b"")), "too large to address"),
        (broken_record(1, output=Tensor("float32", [2**64 - 1], b"")), "too large to address"),
        (broken_record(1, output=Tensor("float32", [1] * 100, b"\x00" * 4)), "100 dimensions"),
        (broken_record(1, created_at=math.nan), "created_at must be finite"),
        (broken_record(1, created_at=math.inf), "created_at must be finite"),
        (broken_record(1, created_at=-math.inf), "created_at must be finite"),
        (broken_record(1, created_at=1e308), "more than a year from now"),
    ],
)
def test_a_result_that_cannot_be_read_back_is_dead_lettered_not_stored(
    broken: Record, detail: str
) -> None:
    client = FakeRedis()
    metrics = LatencyMetrics()
    store = ResultStore(client=cast(Any, client), ttl_s=60, keys=ResultKeys(prefix="p."))
    persist = PersistStage(store=store, output_topic="s", metrics=metrics, clock=lambda: 2.0)
    outcome = persist.process([result_record("r0", 0, None), broken, result_record("r2", 2, None)])
    [rejection] = outcome.rejected
    assert rejection.record is broken and rejection.reason == "malformed"
    assert detail in rejection.detail and "not stored" in rejection.detail
    # The rest of the batch is stored and announced; the latency metric stays finite.
    assert set(client.values) == {"p.result:default:r0", "p.result:default:r2"}
    assert len(outcome.outputs) == 2
    assert metrics.latencies == [1.0, 1.0]


def test_an_empty_tensor_is_a_result_like_any_other() -> None:
    client = FakeRedis()
    empty = broken_record(0, output=Tensor("float32", [0, 4], b""))
    outcome = persist_on(client).process([empty])
    assert outcome.rejected == [] and list(client.values) == ["p.result:trusted:bad"]

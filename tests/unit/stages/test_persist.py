"""persist: results stored per tenant, and Redis running out of memory is a wait, not a loss."""

from __future__ import annotations

import logging
from typing import Any, cast

import numpy as np
import pytest
import redis

from schemas import Codec, Headers, ResultV1, StoredV1, tensor_from_array
from schemas.keys import ResultKeys
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

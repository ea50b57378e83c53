"""The benchmark's outside-in subscriber (bench/e2e.py ``Arrivals``) on the real Redis: it
stamps ids announced in batch notifications of any tenant, and ids on the per-id channels
of older checkouts (``--variant`` of a commit before batch notifications)."""

from __future__ import annotations

import time
import uuid

import pytest
import redis

from bench.driver import Measurement
from bench.e2e import Arrivals
from bench.options import ScenarioSpec
from schemas.keys import ResultKeys
from sinks.redis_store import ResultStore
from streaminfer.settings import Settings

pytestmark = pytest.mark.integration


def test_arrivals_are_stamped_for_batch_and_per_id_notifications(services: None) -> None:
    url = Settings().redis.url.get_secret_value()
    keys = ResultKeys(prefix=f"t{uuid.uuid4().hex[:10]}.")
    client = redis.Redis.from_url(url)
    arrivals = Arrivals(url, keys)
    try:
        created = time.time()
        store = ResultStore(client=client, ttl_s=60, keys=keys)
        store.add("default", "b1", b"x")
        store.add("acme", "b2", b"y")
        store.flush()
        client.publish(f"{keys.prefix}result-ready:default:old:1", b"value")  # the old way
        client.publish(f"{ResultKeys(prefix='other.').channel('default')}", b"\x91\xa2b3")
        measured = Measurement(spec=ScenarioSpec("t", count=4), started=created)
        measured.ids, measured.created = ["b1", "b2", "old:1", "b3"], [created] * 4
        deadline = time.monotonic() + 10
        latencies = arrivals.latencies_ms(measured)
        while latencies["count"] < 3 and time.monotonic() < deadline:
            latencies = arrivals.latencies_ms(measured)
        assert latencies["count"] == 3  # b3 was another pipeline's
        assert 0 <= latencies["p50"] <= latencies["p99"] <= latencies["max"] < 10_000
        assert set(arrivals.at) == {"b1", "b2", "old:1"}
    finally:
        arrivals.close()

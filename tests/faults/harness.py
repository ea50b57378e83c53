"""The ledger that counts losses and duplicates after a fault test's load."""

from __future__ import annotations

import contextlib
from collections import Counter
from dataclasses import dataclass

import redis

from schemas import Codec, ResultV1
from schemas.keys import ResultKeys
from streaminfer.settings import Settings
from tests.fixtures import read_topic, wait_until

RESULTS = Codec(ResultV1)


@dataclass(frozen=True)
class Ledger:
    """What came out for a set of request ids."""

    sent: int
    on_results_topic: Counter[str]
    in_redis: int

    @property
    def lost(self) -> int:
        return self.sent - len(self.on_results_topic)

    @property
    def duplicates(self) -> int:
        return sum(n - 1 for n in self.on_results_topic.values())


def ledger(
    settings: Settings, client: redis.Redis, ids: list[str], *, timeout_s: float = 180
) -> Ledger:
    """Wait until every id is in Redis (or time out), then count the results topic as a
    read_committed reader sees it, once it holds a result per id (or that times out too):
    the fused topology writes Redis before the batch's results commit, so the last results
    may land a moment after the last Redis write."""
    keys = [
        ResultKeys(settings.kafka.topic_prefix).key(settings.kafka.default_tenant, i) for i in ids
    ]

    def stored() -> int:
        return sum(v is not None for v in client.mget(keys))

    # A timeout is not the verdict: the counts below say how many are missing.
    with contextlib.suppress(AssertionError):
        wait_until(lambda: stored() == len(ids), timeout_s, "every result is in Redis")
    wanted = set(ids)
    try:  # the topic holds this test's results only: as many records as ids, or more
        messages = read_topic(settings, settings.topics.results, count=len(ids), timeout_s=30)
    except AssertionError:  # fewer: some are lost, the counts below say how many
        messages = read_topic(settings, settings.topics.results, count=0, timeout_s=30)
    seen: Counter[str] = Counter()
    for message in messages:
        result_id = RESULTS.decode(message.value() or b"").id
        if result_id in wanted:
            seen[result_id] += 1
    return Ledger(sent=len(ids), on_results_topic=seen, in_redis=stored())

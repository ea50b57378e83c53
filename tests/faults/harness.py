"""Load, fault injection and the ledger that counts losses and duplicates."""

from __future__ import annotations

import contextlib
import threading
import time
from collections import Counter
from dataclasses import dataclass

import redis

from ingest.producer import RequestProducer
from schemas import Codec, ResultV1
from streaminfer.kafka import make_producer
from streaminfer.settings import Settings
from tests.fixtures import read_topic, wait_until
from tests.helpers import digits_request, holdout

RESULTS = Codec(ResultV1)


class Load:
    """Sends ``count`` digits requests at ``rate`` per second from a background thread."""

    def __init__(self, settings: Settings, *, count: int, rate: float, tag: str = "f") -> None:
        self.settings = settings
        self.ids = [f"{tag}-{i}" for i in range(count)]
        self.rate = rate
        self.sent = 0
        self.undelivered = -1
        self._sender: RequestProducer | None = None
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> Load:
        self._thread.start()
        return self

    def _run(self) -> None:
        features, _ = holdout()
        # Like a client that retries: outlive a broker restart instead of failing the send.
        producer = make_producer(self.settings, **{"delivery.timeout.ms": 180_000})
        sender = RequestProducer(producer=producer, topic=self.settings.topics.requests)
        self._sender = sender
        started = time.monotonic()
        for i, request_id in enumerate(self.ids):
            # Pace against the clock, not with fixed sleeps, so the rate holds under load.
            ahead = started + i / self.rate - time.monotonic()
            if self._stopped.wait(max(0.0, ahead)):
                break
            sender.send(digits_request(features[i % len(features)], request_id=request_id))
            self.sent = i + 1
        self.undelivered = sender.flush(200)

    def stop(self) -> None:
        """Send no more (of ``ids``, only the first ``sent`` went out)."""
        self._stopped.set()

    def wait_sent(self, fraction: float, timeout_s: float = 60) -> None:
        target = int(len(self.ids) * fraction)
        wait_until(lambda: self.sent >= target, timeout_s, f"{target} requests sent")

    def join(self, timeout_s: float = 240) -> None:
        self._thread.join(timeout_s)
        assert not self._thread.is_alive(), "load did not finish"
        failed = self._sender.failed[:1] if self._sender else []
        assert self.undelivered == 0, f"{self.undelivered} requests not acknowledged: {failed}"


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
    read_committed reader sees it."""
    keys = [f"{settings.kafka.topic_prefix}result:{i}" for i in ids]

    def stored() -> int:
        return sum(v is not None for v in client.mget(keys))

    # A timeout is not the verdict: the counts below say how many are missing.
    with contextlib.suppress(AssertionError):
        wait_until(lambda: stored() == len(ids), timeout_s, "every result is in Redis")
    wanted = set(ids)
    messages = read_topic(settings, settings.topics.results, count=0, timeout_s=30)
    seen: Counter[str] = Counter()
    for message in messages:
        result_id = RESULTS.decode(message.value() or b"").id
        if result_id in wanted:
            seen[result_id] += 1
    return Ledger(sent=len(ids), on_results_topic=seen, in_redis=stored())

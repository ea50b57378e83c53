"""Running :class:`BackfillRun` without Kafka: a producer that acknowledges on ``poll``, and
one run with the unit tests' defaults (topic ``t``, a silent progress line, a checkpoint
saved at every tick: as many chances to be wrong as possible)."""

from __future__ import annotations

import io
import threading
from collections.abc import Callable, Sequence
from typing import Any

from backfill.checkpoint import Checkpoint, CheckpointStore, RejectReport
from backfill.engine import BackfillRun, RunOutcome, Source
from backfill.pacing import ProgressLine


class AckingProducer:
    """Keeps every record and acknowledges all of them on ``poll`` (the librdkafka
    delivery-report contract). ``on_produce(n)`` runs after the n-th record."""

    def __init__(self, on_produce: Callable[[int], None] = lambda _n: None) -> None:
        self.records: list[dict[str, Any]] = []
        self._pending: list[Callable[[Any, Any], None]] = []
        self._on_produce = on_produce

    def produce(self, topic: str, *, on_delivery: Any, **record: Any) -> None:
        self.records.append({"topic": topic, **record})
        self._pending.append(on_delivery)
        self._on_produce(len(self.records))

    def poll(self, _timeout: float = 0) -> int:
        served, self._pending = self._pending, []
        for callback in served:
            callback(None, None)
        return len(served)

    def __len__(self) -> int:
        return len(self._pending)

    def headers(self, index: int) -> dict[str, Any]:
        return dict(self.records[index]["headers"])


def run_engine(
    producer: Any,
    store: CheckpointStore,
    checkpoint: Checkpoint,
    sources: Sequence[Source],
    *,
    stop: threading.Event | None = None,
    **options: Any,
) -> RunOutcome:
    """One :class:`BackfillRun` of ``sources`` to its end (or ``stop``); ``options`` are
    further :class:`BackfillRun` arguments. The reject report is closed afterwards."""
    rejects = RejectReport(store.rejects_path(checkpoint.backfill_id))
    engine = BackfillRun(
        producer=producer,
        topic="t",
        store=store,
        checkpoint=checkpoint,
        rejects=rejects,
        stop=stop or threading.Event(),
        progress=ProgressLine(checkpoint.backfill_id, out=io.StringIO()),
        checkpoint_interval_s=0.0,
        **options,
    )
    outcome = engine.run(sources)
    rejects.close()
    return outcome

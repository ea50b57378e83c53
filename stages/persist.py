"""persist: store each result in Redis, then announce it on ``inference.stored``.

Input: ``inference.results`` (``ResultV1``). Output: ``inference.stored`` (``StoredV1``).
Redis first, offsets after: the batch is written in one pipeline and the stored notices are
only produced (and offsets committed) once Redis acknowledged. Redis errors are transient
(:class:`SinkUnavailable`): the runtime rewinds and retries, nothing is dead-lettered.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

import redis

from schemas import Codec, DecodeError, ResultV1, StoredV1
from schemas.messages import SCHEMA_NAMES
from sinks.redis_store import ResultStore
from stages.errors import SinkUnavailable
from stages.metrics import NullMetrics, StageMetrics
from stages.records import BatchOutcome, Output, Record, Rejection, output_headers

_SCHEMA = SCHEMA_NAMES[StoredV1]


class PersistStage:
    name = "persist"

    def __init__(
        self,
        *,
        store: ResultStore,
        output_topic: str,
        metrics: StageMetrics | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._store = store
        self._output_topic = output_topic
        self._metrics: StageMetrics = metrics or NullMetrics()
        self._clock = clock
        self._results = Codec(ResultV1)
        self._notices = Codec(StoredV1)

    def process(self, batch: Sequence[Record]) -> BatchOutcome:
        outcome = BatchOutcome.empty()
        accepted: list[tuple[Record, ResultV1]] = []
        for record in batch:
            try:
                result = self._results.decode(record.value)
            except DecodeError as exc:
                detail = f"not a valid inference.result/1: {exc}"
                outcome.rejected.append(Rejection(record, "malformed", detail))
                continue
            # The original bytes are stored: no re-encoding, and readers get what infer wrote.
            self._store.add(result.id, record.value)
            accepted.append((record, result))
        try:
            self._store.flush()
        except redis.RedisError as exc:
            self._store.discard()
            raise SinkUnavailable(f"Redis write failed: {exc}") from exc
        stored_at = self._clock()
        for record, result in accepted:
            self._metrics.end_to_end(stored_at - result.created_at)
            notice = StoredV1(
                id=result.id,
                model=result.model,
                model_version=result.model_version,
                key=self._store.key(result.id),
                created_at=result.created_at,
                stored_at=stored_at,
                label=result.label,
            )
            outcome.outputs.append(
                Output(
                    topic=self._output_topic,
                    key=record.key,
                    value=self._notices.encode(notice),
                    headers=output_headers(record, _SCHEMA),
                )
            )
        return outcome

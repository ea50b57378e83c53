"""persist: store each result in Redis, then announce it on ``inference.stored``.

Input: ``inference.results`` (``ResultV1``). Output: ``inference.stored`` (``StoredV1``).
Redis first, offsets after: the batch is written in one round trip (a ``SET`` per result, then
one notification per tenant naming the batch's ids, see :mod:`sinks.redis_store`) and the
stored notices are only produced (and offsets committed) once Redis acknowledged. Redis
errors are transient (:class:`SinkUnavailable`): the runtime rewinds and retries, nothing is
dead-lettered. That includes Redis refusing writes for lack of memory (OOM): persist waits,
counts it (``streaminfer_redis_oom_total``) and says what the operator should do.

A record that is not a result, or a result that must not be stored (a tensor whose buffer
does not match its dtype and shape, ``created_at`` not a finite time within a year of now),
is dead-lettered as ``malformed``: nothing reads it back from Redis.

Each result is stored under its record's tenant (the ``streaminfer.tenant`` header ingest set,
else ``default_tenant``): ``result:<tenant>:<id>``, so tenants never share a key.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence

import redis

from schemas import Codec, DecodeError, Headers, ResultV1, StoredV1
from schemas.keys import DEFAULT_TENANT, tenant_of
from schemas.messages import SCHEMA_NAMES
from schemas.tensors import TensorError, check_tensor
from schemas.validation import check_times
from sinks.redis_store import ResultStore
from stages.errors import SinkUnavailable
from stages.metrics import NullMetrics, StageMetrics
from stages.records import BatchOutcome, Output, Record, Rejection, output_headers

log = logging.getLogger(__name__)
_SCHEMA = SCHEMA_NAMES[StoredV1]
# Memory does not come back in milliseconds: wait longer than after a dropped connection.
OOM_RETRY_AFTER_S = 2.0


class PersistStage:
    name = "persist"

    def __init__(
        self,
        *,
        store: ResultStore,
        output_topic: str,
        default_tenant: str = DEFAULT_TENANT,
        metrics: StageMetrics | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._store = store
        self._output_topic = output_topic
        self._default_tenant = default_tenant
        self._metrics: StageMetrics = metrics or NullMetrics()
        self._clock = clock
        self._results = Codec(ResultV1)
        self._notices = Codec(StoredV1)

    def process(self, batch: Sequence[Record]) -> BatchOutcome:
        outcome = BatchOutcome.empty()
        accepted: list[tuple[Record, ResultV1, str]] = []
        now = self._clock()
        add = self._store.add
        for record in batch:
            result = self._decode(record, now=now)
            if isinstance(result, Rejection):
                outcome.rejected.append(result)
                continue
            tenant = tenant_of(record.header(Headers.TENANT), self._default_tenant)
            # The original bytes are stored: no re-encoding, and readers get what infer wrote.
            add(tenant, result.id, record.value)
            accepted.append((record, result, tenant))
        self._flush()
        stored_at = self._clock()
        prefixes: dict[str, str] = {}  # tenant -> key prefix (quoting a tenant is not free)
        end_to_end, notice, outputs = self._metrics.end_to_end, self._notice, outcome.outputs
        for record, result, tenant in accepted:
            end_to_end(stored_at - result.created_at)
            prefix = prefixes.get(tenant)
            if prefix is None:
                prefix = prefixes[tenant] = self._store.keys.key_prefix(tenant)
            outputs.append(notice(record, result, prefix + result.id, stored_at))
        return outcome

    def _decode(self, record: Record, *, now: float) -> ResultV1 | Rejection:
        """The result in ``record``, or a ``malformed`` rejection when it is none or is one
        that must not be stored (see :func:`storable_problem`)."""
        try:
            result = self._results.decode(record.value)
        except DecodeError as exc:
            return Rejection(record, "malformed", f"not a valid inference.result/1: {exc}")
        problem = storable_problem(result, now=now)
        if problem is not None:
            return Rejection(record, "malformed", f"inference.result/1 not stored: {problem}")
        return result

    def _flush(self) -> None:
        started = time.perf_counter()
        try:
            written = self._store.flush()
        except redis.RedisError as exc:
            self._metrics.redis_command(
                command="pipeline", seconds=time.perf_counter() - started, ok=False
            )
            self._store.discard()
            if is_out_of_memory(exc):
                self._metrics.redis_oom()
                log.error(
                    "persist: Redis is out of memory (maxmemory reached and nothing it may "
                    "evict); results wait in Kafka and are retried. Operator: give Redis more "
                    "maxmemory, use an eviction policy that frees results "
                    "(volatile-ttl or allkeys-lru), or lower STREAMINFER_REDIS_RESULT_TTL_S"
                )
                raise SinkUnavailable(
                    f"Redis is out of memory: {exc}", retry_after_s=OOM_RETRY_AFTER_S
                ) from exc
            raise SinkUnavailable(f"Redis write failed: {exc}") from exc
        if written:  # an empty flush asks Redis nothing
            self._metrics.redis_command(
                command="pipeline", seconds=time.perf_counter() - started, ok=True
            )

    def _notice(self, record: Record, result: ResultV1, key: str, stored_at: float) -> Output:
        notice = StoredV1(
            id=result.id,
            model=result.model,
            model_version=result.model_version,
            key=key,
            created_at=result.created_at,
            stored_at=stored_at,
            label=result.label,
        )
        return Output(
            topic=self._output_topic,
            key=record.key,
            value=self._notices.encode(notice),
            headers=output_headers(record, _SCHEMA),
        )


def storable_problem(result: ResultV1, *, now: float) -> str | None:
    """Why ``result`` must not be stored, or None. Decoding checks types only; a result
    written straight to Kafka can still hold a tensor whose buffer does not match its shape
    (every reader of the stored result would fail on it) or a ``created_at`` that is not a
    finite, sane time (it would poison the end-to-end latency metric for good). A few
    Python operations per record: the same checks validate applies to requests."""
    times = check_times(result.created_at, None, now=now)
    if times is not None:
        return times.detail
    for name, tensor in result.outputs.items():
        try:
            check_tensor(tensor)
        except TensorError as exc:
            return f"output {name!r}: {exc}"
    return None


def is_out_of_memory(exc: redis.RedisError) -> bool:
    """Redis answered OOM (``maxmemory`` reached). A pipeline prefixes the server's message
    with ``Command # N (...) of pipeline caused error:``, so look past that."""
    if isinstance(exc, redis.exceptions.OutOfMemoryError):
        return True
    if not isinstance(exc, redis.exceptions.ResponseError):
        return False
    message = str(exc).rpartition("caused error: ")[2]
    return message.startswith("OOM")

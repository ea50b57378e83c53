"""Tracing hooks: what the stage runtime and ingest call, with a no-op default.

The pipeline always propagates W3C trace context (every record carries ``traceparent``,
see :mod:`schemas.traceparent`); recording spans is optional. The runtime is handed a
:class:`StageTracer` and ingest a :class:`RequestTracer`; with tracing off they get
:data:`NO_TRACING` / ``None`` and nothing but a few attribute lookups per batch happens
(the OpenTelemetry SDK is not even imported). The OpenTelemetry implementation is
``streaminfer/spans.py``, chosen from the standard ``OTEL_*`` variables by
``streaminfer/tracing.py``.

Span shape, per stage and batch (per-record spans for *every* record would double the
cost of a small record; these are made only for records whose trace is sampled):

* ``<stage> batch``: one root span per batch, with a child per step: ``consume``,
  ``transform``, ``produce`` (publishing; a transaction commit due then nests in it) and
  ``commit``;
* ``<stage>``: one span per sampled record, child of the span its ``traceparent`` names and
  linked to the batch span; its outputs' ``traceparent`` names it, so the next stage's span
  is its child and one request is one trace: ingest -> validate -> infer -> persist.

A stage makes its outputs with the record's own ``traceparent``
(:func:`stages.records.output_headers`): a hop that records no span (tracing off, or an
unsampled record) draws no id and leaves the parent to whichever hop records next.

Logs: :func:`record_trace_id` is the trace id of the one record in hand (the runtime's
record-at-a-time replay), for the JSON log formatter.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from contextvars import ContextVar
from types import TracebackType
from typing import Final, Literal, Protocol

from schemas import Headers
from stages.records import BatchOutcome, Record

StepName = Literal["consume", "transform", "produce", "commit"]


class BatchTrace(Protocol):
    """The spans of one batch in hand. Entered while the batch is processed; every span it
    started ends on exit (with an error status when the block raised)."""

    def __enter__(self) -> BatchTrace: ...

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None: ...

    def step(self, name: StepName) -> AbstractContextManager[object]:
        """A child span of the batch for one step."""
        ...

    def outcome(self, outcome: BatchOutcome) -> None:
        """What the stage made of the batch: each output's ``traceparent`` header is set, in
        place, to its record's span (matched by trace id); rejected records' spans say why."""
        ...


class StageTracer(Protocol):
    """Spans of one stage worker."""

    def batch(self, records: Sequence[Record], *, consume_started_ns: int) -> BatchTrace:
        """The spans of ``records``, consumed since ``consume_started_ns`` (``time_ns``)."""
        ...

    def step(self, name: StepName) -> AbstractContextManager[object]:
        """A step span: child of the batch in hand, a root span outside one (a commit that
        falls due while the stage is idle)."""
        ...


class RequestTrace(Protocol):
    """The root span of one request, started by ingest."""

    @property
    def traceparent(self) -> bytes:
        """The W3C ``traceparent`` naming this span: the request record's header."""
        ...

    def end(self, error: str | None = None) -> None:
        """Kafka acknowledged the record (``error`` None) or did not."""
        ...


class RequestTracer(Protocol):
    def start(self, request_id: str, *, topic: str) -> RequestTrace: ...


class _NoBatchTrace:
    """Does nothing; one instance serves every batch."""

    def __enter__(self) -> _NoBatchTrace:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        return None

    def step(self, name: StepName) -> AbstractContextManager[object]:
        return _NO_STEP

    def outcome(self, outcome: BatchOutcome) -> None:
        return None


class NoTracing:
    """The :class:`StageTracer` when tracing is off."""

    def batch(self, records: Sequence[Record], *, consume_started_ns: int) -> BatchTrace:
        return _NO_BATCH

    def step(self, name: StepName) -> AbstractContextManager[object]:
        return _NO_STEP


_NO_STEP: Final = nullcontext()
_NO_BATCH: Final = _NoBatchTrace()
NO_TRACING: Final = NoTracing()

_record_trace: ContextVar[str | None] = ContextVar("streaminfer_record_trace", default=None)


def trace_id_of(record: Record) -> str | None:
    """The 32-hex trace id of ``record``'s ``traceparent``; None when absent or malformed."""
    value = record.header(Headers.TRACEPARENT)
    if value is None:
        return None
    parts = value.split(b"-")
    if len(parts) != 4 or len(parts[1]) != 32:
        return None
    return parts[1].decode("ascii", errors="replace")


@contextmanager
def record_in_hand(record: Record) -> Iterator[None]:
    """While the block runs, :func:`record_trace_id` is ``record``'s trace id."""
    token = _record_trace.set(trace_id_of(record))
    try:
        yield
    finally:
        _record_trace.reset(token)


def record_trace_id() -> str | None:
    """The trace id of the one record in hand (see :func:`record_in_hand`), if any."""
    return _record_trace.get()

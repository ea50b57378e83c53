"""OpenTelemetry spans of the stages and of ingest: the implementation of the hooks in
:mod:`stages.tracing` (read that module for the shape of the spans).

Imported only when tracing is on (``streaminfer/tracing.py``): with it off, no process
imports the OpenTelemetry SDK.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from contextlib import AbstractContextManager
from types import TracebackType
from typing import Final

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.trace import (
    Link,
    NonRecordingSpan,
    Span,
    SpanContext,
    SpanKind,
    Status,
    StatusCode,
    TraceFlags,
    Tracer,
)
from opentelemetry.util.types import Attributes

from schemas import Headers
from stages.records import BatchOutcome, Record
from stages.tracing import StepName

TRACEPARENT: Final = Headers.TRACEPARENT


def remote_parent(traceparent: bytes | None) -> tuple[bytes, Context] | None:
    """(trace id, context) of a sampled ``traceparent``; None when it is absent, malformed or
    not sampled (then no span is made: the record keeps the trace it came with)."""
    if traceparent is None:
        return None
    parts = traceparent.split(b"-")
    if len(parts) != 4 or len(parts[1]) != 32 or len(parts[2]) != 16 or len(parts[3]) != 2:
        return None
    try:
        trace_id, span_id, flags = int(parts[1], 16), int(parts[2], 16), int(parts[3], 16)
    except ValueError:
        return None
    if not flags & TraceFlags.SAMPLED or not trace_id or not span_id:
        return None
    parent = SpanContext(trace_id, span_id, is_remote=True, trace_flags=TraceFlags(flags))
    return parts[1], trace.set_span_in_context(NonRecordingSpan(parent))


def traceparent_of(span: Span) -> bytes:
    """The W3C ``traceparent`` that names ``span``."""
    ctx = span.get_span_context()
    return f"00-{ctx.trace_id:032x}-{ctx.span_id:016x}-{int(ctx.trace_flags):02x}".encode()


def _trace_id(traceparent: str | bytes | None) -> bytes | None:
    if not isinstance(traceparent, bytes):
        return None
    parts = traceparent.split(b"-", 2)
    return parts[1] if len(parts) == 3 else None


class OtelBatchTrace:
    """The spans of one batch (see :class:`stages.tracing.BatchTrace`)."""

    def __init__(
        self, tracer: Tracer, stage: str, records: Sequence[Record], consume_started_ns: int
    ) -> None:
        self._tracer = tracer
        self._stage = stage
        self._records = records
        self._consume_started_ns = consume_started_ns
        self._span: Span | None = None
        self._token: object = None
        self._record_spans: list[Span] = []
        self._by_trace: dict[bytes, Span] = {}

    def __enter__(self) -> OtelBatchTrace:
        consumed_ns = time.time_ns()
        span = self._tracer.start_span(
            f"{self._stage} batch",
            start_time=self._consume_started_ns,
            attributes={
                "streaminfer.stage": self._stage,
                "messaging.batch.message_count": len(self._records),
            },
        )
        self._span = span
        self._token = otel_context.attach(trace.set_span_in_context(span))
        consume = self._tracer.start_span(
            f"{self._stage} consume", start_time=self._consume_started_ns
        )
        consume.end(end_time=consumed_ns)
        self._start_record_spans(Link(span.get_span_context()), consumed_ns)
        return self

    def _start_record_spans(self, batch: Link, started_ns: int) -> None:
        for record in self._records:
            found = remote_parent(record.header(TRACEPARENT))
            if found is None:
                continue
            trace_id, parent = found
            span = self._tracer.start_span(
                self._stage,
                context=parent,
                kind=SpanKind.CONSUMER,
                links=(batch,),
                start_time=started_ns,
                attributes=_record_attributes(record),
            )
            self._record_spans.append(span)
            self._by_trace[trace_id] = span

    def step(self, name: StepName) -> AbstractContextManager[object]:
        return self._tracer.start_as_current_span(f"{self._stage} {name}")

    def outcome(self, outcome: BatchOutcome) -> None:
        if not self._by_trace:
            return
        for output in outcome.outputs:
            headers = output.headers
            for index, (name, value) in enumerate(headers):
                if name == TRACEPARENT:
                    span = self._by_trace.get(_trace_id(value) or b"")
                    if span is not None:  # the output's parent is its record's span
                        headers[index] = (TRACEPARENT, traceparent_of(span))
                    break
        for rejection in outcome.rejected:
            span = self._by_trace.get(_trace_id(rejection.record.header(TRACEPARENT)) or b"")
            if span is not None:
                span.set_attribute("streaminfer.dlq.reason", rejection.reason)
                span.set_status(Status(StatusCode.ERROR, f"dead-lettered: {rejection.reason}"))

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        ended_ns = time.time_ns()
        failed = Status(StatusCode.ERROR, f"{exc_type.__name__}: {exc}") if exc_type else None
        for span in self._record_spans:
            if failed is not None:
                span.set_status(failed)
            span.end(end_time=ended_ns)
        if self._token is not None:
            otel_context.detach(self._token)  # type: ignore[arg-type]
        if self._span is not None:
            if failed is not None and exc is not None:
                self._span.record_exception(exc)
                self._span.set_status(failed)
            self._span.end(end_time=ended_ns)


def _record_attributes(record: Record) -> Attributes:
    return {
        "messaging.system": "kafka",
        "messaging.destination.name": record.topic,
        "messaging.destination.partition.id": str(record.partition),
        "messaging.kafka.offset": record.offset,
    }


class OtelStageTracer:
    """The :class:`stages.tracing.StageTracer` of one stage worker."""

    def __init__(self, *, tracer: Tracer, stage: str) -> None:
        self._tracer = tracer
        self._stage = stage

    def batch(self, records: Sequence[Record], *, consume_started_ns: int) -> OtelBatchTrace:
        return OtelBatchTrace(self._tracer, self._stage, records, consume_started_ns)

    def step(self, name: StepName) -> AbstractContextManager[object]:
        return self._tracer.start_as_current_span(f"{self._stage} {name}")


class OtelRequestTrace:
    """The root span of one request (see :class:`stages.tracing.RequestTrace`)."""

    __slots__ = ("_span",)

    def __init__(self, span: Span) -> None:
        self._span = span

    @property
    def traceparent(self) -> bytes:
        return traceparent_of(self._span)

    def end(self, error: str | None = None) -> None:
        if error is not None:
            self._span.set_status(Status(StatusCode.ERROR, error))
        self._span.end()


class OtelRequestTracer:
    """Starts the trace of each request ingest writes: its root span, which covers the
    record's produce until Kafka's acknowledgement."""

    def __init__(self, *, tracer: Tracer) -> None:
        self._tracer = tracer

    def start(self, request_id: str, *, topic: str) -> OtelRequestTrace:
        span = self._tracer.start_span(
            "ingest",
            kind=SpanKind.PRODUCER,
            attributes={
                "streaminfer.request.id": request_id,
                "messaging.system": "kafka",
                "messaging.destination.name": topic,
            },
        )
        return OtelRequestTrace(span)

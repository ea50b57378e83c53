"""Tracing: when it is on, the spans a batch makes, and that off imports nothing."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from schemas import Headers
from stages.records import BatchOutcome, Output, Record, Rejection
from stages.tracing import record_in_hand, record_trace_id
from streaminfer import tracing
from streaminfer.settings import TracingSettings
from streaminfer.spans import OtelRequestTracer, OtelStageTracer, remote_parent
from tests.helpers import REPO

TRACE = "0af7651916cd43dd8448eb211c80319c"
PARENT = "b7ad6b7169203331"


def traceparent(trace_id: str = TRACE, span_id: str = PARENT, flags: str = "01") -> bytes:
    return f"00-{trace_id}-{span_id}-{flags}".encode()


def record(offset: int, tp: bytes | None) -> Record:
    headers = ((Headers.TRACEPARENT, tp),) if tp is not None else ()
    return Record(topic="in", partition=0, offset=offset, key=None, value=b"v", headers=headers)


def output_of(source: Record) -> Output:
    """As a stage makes it: a child traceparent of the source's, with a made-up span id."""
    parent = source.header(Headers.TRACEPARENT) or b""
    child = parent[:36] + b"ffffffffffffffff" + parent[52:]
    return Output(topic="out", key=None, value=b"o", headers=[(Headers.TRACEPARENT, child)])


@pytest.fixture()
def exporter() -> InMemorySpanExporter:
    return InMemorySpanExporter()


@pytest.fixture()
def provider(exporter: InMemorySpanExporter) -> TracerProvider:
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    return provider


def by_name(spans: tuple[ReadableSpan, ...], name: str) -> list[ReadableSpan]:
    return [s for s in spans if s.name == name]


@pytest.mark.parametrize(
    ("environ", "on"),
    [
        ({}, False),
        ({"OTEL_TRACES_EXPORTER": "none"}, False),
        ({"OTEL_TRACES_EXPORTER": "otlp"}, True),
        ({"OTEL_TRACES_EXPORTER": "console, otlp"}, True),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4318"}, True),
        ({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://127.0.0.1:4318/v1/traces"}, True),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://x", "OTEL_TRACES_EXPORTER": "none"}, False),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://x", "OTEL_SDK_DISABLED": "true"}, False),
        ({"OTEL_SERVICE_NAME": "x"}, False),
    ],
)
def test_tracing_is_on_only_when_the_otel_variables_ask_for_it(
    environ: dict[str, str], on: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in [n for n in os.environ if n.startswith("OTEL_")]:
        monkeypatch.delenv(name)
    for name, value in environ.items():
        monkeypatch.setenv(name, value)
    assert tracing.enabled(TracingSettings()) is on


def test_with_tracing_off_the_stage_tracer_is_the_no_op_and_no_sdk_is_imported() -> None:
    code = (
        "import sys\n"
        "from streaminfer import tracing, wiring, ingest_app\n"
        "from streaminfer.settings import TracingSettings\n"
        "assert tracing.stage_tracer(TracingSettings(), 'validate', 'w') is tracing.NO_TRACING\n"
        "assert tracing.request_tracer(TracingSettings()) is None\n"
        # redis-py imports opentelemetry.sdk.metrics when the SDK is installed; our code
        # must not import the tracing SDK (nor, through it, an exporter).
        "print(sorted(m for m in sys.modules if m.startswith(('opentelemetry.sdk.trace', "
        "'opentelemetry.exporter', 'streaminfer.spans'))))\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


def test_a_sampled_record_gets_a_span_whose_parent_is_its_traceparent(
    provider: TracerProvider, exporter: InMemorySpanExporter
) -> None:
    tracer = OtelStageTracer(tracer=provider.get_tracer("t"), stage="validate")
    source = record(7, traceparent())
    output = output_of(source)
    with tracer.batch([source], consume_started_ns=1) as batch:
        with batch.step("transform"):
            pass
        batch.outcome(BatchOutcome(outputs=[output], rejected=[]))
        with batch.step("produce"):
            pass

    spans = exporter.get_finished_spans()
    (mine,) = by_name(spans, "validate")
    assert f"{mine.context.trace_id:032x}" == TRACE
    assert mine.parent is not None and f"{mine.parent.span_id:016x}" == PARENT
    assert mine.kind is SpanKind.CONSUMER
    (batch_span,) = by_name(spans, "validate batch")
    assert [link.context.span_id for link in mine.links] == [batch_span.context.span_id]
    # The output now names the record's span: the next stage's span is its child.
    assert output.headers == [
        (Headers.TRACEPARENT, traceparent(span_id=f"{mine.context.span_id:016x}"))
    ]
    for step in ("consume", "transform", "produce"):
        (span,) = by_name(spans, f"validate {step}")
        assert span.parent is not None and span.parent.span_id == batch_span.context.span_id


def test_unsampled_or_missing_trace_context_makes_no_record_span(
    provider: TracerProvider, exporter: InMemorySpanExporter
) -> None:
    tracer = OtelStageTracer(tracer=provider.get_tracer("t"), stage="infer")
    unsampled = record(1, traceparent(flags="00"))
    output = output_of(unsampled)
    before = list(output.headers)
    with tracer.batch(
        [unsampled, record(2, None), record(3, b"garbage")], consume_started_ns=1
    ) as b:
        b.outcome(BatchOutcome(outputs=[output], rejected=[]))
    names = [s.name for s in exporter.get_finished_spans()]
    assert "infer" not in names
    assert "infer batch" in names
    assert output.headers == before


def test_a_dead_lettered_record_span_says_why(
    provider: TracerProvider, exporter: InMemorySpanExporter
) -> None:
    tracer = OtelStageTracer(tracer=provider.get_tracer("t"), stage="validate")
    bad = record(1, traceparent())
    with tracer.batch([bad], consume_started_ns=1) as batch:
        batch.outcome(BatchOutcome(outputs=[], rejected=[Rejection(bad, "unknown_model", "x")]))
    (span,) = by_name(exporter.get_finished_spans(), "validate")
    assert span.status.status_code is StatusCode.ERROR
    assert (
        span.attributes is not None and span.attributes["streaminfer.dlq.reason"] == "unknown_model"
    )


def test_a_failed_batch_ends_every_span_with_an_error(
    provider: TracerProvider, exporter: InMemorySpanExporter
) -> None:
    tracer = OtelStageTracer(tracer=provider.get_tracer("t"), stage="persist")
    with (
        pytest.raises(RuntimeError),
        tracer.batch([record(1, traceparent())], consume_started_ns=1),
    ):
        raise RuntimeError("redis down")
    spans = exporter.get_finished_spans()
    assert {s.name for s in spans} == {"persist batch", "persist consume", "persist"}
    assert by_name(spans, "persist")[0].status.status_code is StatusCode.ERROR
    assert by_name(spans, "persist batch")[0].status.status_code is StatusCode.ERROR


def test_a_commit_outside_a_batch_is_a_root_span(
    provider: TracerProvider, exporter: InMemorySpanExporter
) -> None:
    with OtelStageTracer(tracer=provider.get_tracer("t"), stage="infer").step("commit"):
        pass
    (span,) = exporter.get_finished_spans()
    assert span.name == "infer commit" and span.parent is None


def test_ingest_starts_the_trace_and_its_traceparent_names_the_root_span(
    provider: TracerProvider, exporter: InMemorySpanExporter
) -> None:
    trace = OtelRequestTracer(tracer=provider.get_tracer("t")).start("r1", topic="requests")
    found = remote_parent(trace.traceparent)
    trace.end()
    (span,) = exporter.get_finished_spans()
    assert span.parent is None and span.kind is SpanKind.PRODUCER
    assert found is not None and found[0] == f"{span.context.trace_id:032x}".encode()
    flags = f"{int(span.context.trace_flags):02x}"  # sampled, and W3C level 2's random bit
    assert trace.traceparent == traceparent(
        f"{span.context.trace_id:032x}", f"{span.context.span_id:016x}", flags
    )
    assert span.attributes is not None and span.attributes["streaminfer.request.id"] == "r1"


def test_the_record_in_hand_names_its_trace_for_the_logs() -> None:
    assert record_trace_id() is None
    with record_in_hand(record(1, traceparent())):
        assert record_trace_id() == TRACE
    assert record_trace_id() is None

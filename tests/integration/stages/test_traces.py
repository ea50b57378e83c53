"""One request becomes one trace: ingest -> validate -> infer -> persist.

In process, on the real broker and Redis: ingest's producing path (``AsyncProducer`` with its
request tracer) and the three stages as built by ``streaminfer.wiring``, every span going to
the SDK's in-memory exporter.
"""

from __future__ import annotations

import asyncio
import itertools
import threading
import uuid

import pytest
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from ingest.delivery import AsyncProducer, Delivery
from ingest.payloads import Submission
from streaminfer import wiring
from streaminfer.kafka import make_producer
from streaminfer.settings import Settings
from streaminfer.spans import OtelRequestTracer, OtelStageTracer
from tests.fixtures import wait_until
from tests.helpers import REQUESTS, digits_request, holdout

pytestmark = pytest.mark.integration


def _ingest(settings: Settings, provider: TracerProvider, request_id: str) -> Delivery:
    features, _ = holdout()
    request = digits_request(features[0], request_id=request_id)
    submission = Submission(
        request=request, value=REQUESTS.encode(request), partition_key=request_id
    )

    async def send() -> Delivery:
        producer = AsyncProducer(
            producer=make_producer(settings),
            topic=settings.topics.requests,
            queue_limit=100,
            tracer=OtelRequestTracer(tracer=provider.get_tracer("ingest")),
        )
        producer.start()
        try:
            return await asyncio.wait_for(producer.send([submission]), timeout=30)
        finally:
            producer.close(10)

    return asyncio.run(send())


def _trace_of(spans: tuple[ReadableSpan, ...], request_id: str) -> dict[str, ReadableSpan]:
    (root,) = [
        s
        for s in spans
        if s.name == "ingest" and (s.attributes or {}).get("streaminfer.request.id") == request_id
    ]
    assert root.context is not None
    same = [
        s for s in spans if s.context is not None and s.context.trace_id == root.context.trace_id
    ]
    return {s.name: s for s in same}


def test_one_request_is_one_trace_through_every_stage(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    monkeypatch.setattr(
        wiring,
        "stage_tracer",
        lambda _config, name, worker: OtelStageTracer(tracer=provider.get_tracer(name), stage=name),
    )
    runners = [wiring.build_runner(settings, name) for name in wiring.STAGE_NAMES]
    stop = threading.Event()
    threads = [threading.Thread(target=r.run, args=(stop,), daemon=True) for r in runners]
    for thread in threads:
        thread.start()
    request_id = f"traced-{uuid.uuid4().hex[:8]}"
    try:
        assert _ingest(settings, provider, request_id).ok
        wait_until(
            lambda: "persist" in _trace_of(exporter.get_finished_spans(), request_id),
            90,
            "the persist span of the request is exported",
        )
    finally:
        stop.set()
        for thread in threads:
            thread.join(60)

    trace = _trace_of(exporter.get_finished_spans(), request_id)
    chain = ["ingest", "validate", "infer", "persist"]
    assert set(chain) <= set(trace), sorted(trace)
    assert trace["ingest"].parent is None  # ingest starts the trace
    for parent, child in itertools.pairwise(chain):
        parent_ctx, child_parent = trace[parent].context, trace[child].parent
        assert parent_ctx is not None and child_parent is not None
        assert child_parent.span_id == parent_ctx.span_id, f"{child}'s parent is not {parent}"
    # Each stage's record span links to the batch span that carried it (a trace of its own).
    batches = {s.context.span_id: s.name for s in exporter.get_finished_spans() if s.context}
    for stage in chain[1:]:
        (link,) = trace[stage].links
        assert batches[link.context.span_id] == f"{stage} batch"

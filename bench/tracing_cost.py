"""What tracing costs the stage runtime: ``python -m bench.tracing_cost``.

CPU time of the validate stage's transform on a batch of digits requests, with the runtime's
tracing hooks off (``NO_TRACING``) and on (the OpenTelemetry SDK, a batch span processor and
an exporter that drops everything, so only our side and the SDK's are counted), for sampled
and unsampled records. Also the hooks' cost per batch with tracing off. Best of 7 runs.
"""

from __future__ import annotations

import time
import timeit
from collections.abc import Sequence

import numpy as np
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult

from kafkaio.produce import request_headers
from schemas import Codec, Headers, RequestV1, tensor_from_array
from schemas.models import ModelCatalog
from stages.records import BatchOutcome, Record
from stages.tracing import NO_TRACING, StageTracer
from stages.validate import ValidateStage
from streaminfer.settings import REPO_ROOT
from streaminfer.spans import OtelStageTracer

MODELS = REPO_ROOT / "models"
REQUESTS = Codec(RequestV1)


class Drop(SpanExporter):
    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        return SpanExportResult.SUCCESS


def records(count: int, *, sampled: bool) -> list[Record]:
    x = np.load(MODELS / "digits" / "holdout.npz")["X"].astype(np.float32)
    made = []
    for i in range(count):
        headers = dict(request_headers())
        tp = bytes(headers[Headers.TRACEPARENT] or b"")
        headers[Headers.TRACEPARENT] = tp if sampled else tp[:-2] + b"00"
        request = RequestV1(
            id=f"r{i}",
            model="digits",
            inputs={"input": tensor_from_array(x[i % len(x)])},
            created_at=time.time(),
        )
        value = REQUESTS.encode(request)
        pairs = tuple(
            (k, v if isinstance(v, bytes) else str(v).encode()) for k, v in headers.items()
        )
        made.append(Record("requests", 0, i, None, value, pairs))
    return made


def batch_ns(tracer: StageTracer, stage: ValidateStage, batch: list[Record]) -> int:
    started = time.process_time_ns()
    with tracer.batch(batch, consume_started_ns=time.time_ns()) as trace:
        with trace.step("transform"):
            outcome = stage.process(batch)
        trace.outcome(outcome)
        with trace.step("produce"):
            pass
    return time.process_time_ns() - started


def best_ns(tracer: StageTracer, stage: ValidateStage, batch: list[Record], reps: int) -> float:
    return min(sum(batch_ns(tracer, stage, batch) for _ in range(reps)) / reps for _ in range(7))


def hooks_off_ns() -> float:
    empty = BatchOutcome.empty()

    def hooks() -> None:
        with NO_TRACING.batch([], consume_started_ns=time.time_ns()) as trace:
            with trace.step("transform"):
                pass
            trace.outcome(empty)
            with trace.step("produce"):
                pass

    n = 100_000
    return 1e9 * min(timeit.repeat(hooks, number=n, repeat=5)) / n


def main() -> None:
    stage = ValidateStage(catalog=ModelCatalog(MODELS), output_topic="validated")
    provider = TracerProvider()
    provider.add_span_processor(BatchSpanProcessor(Drop(), max_queue_size=1_000_000))
    on = OtelStageTracer(tracer=provider.get_tracer("bench"), stage="validate")
    print(f"tracing off: the hooks cost {hooks_off_ns():.0f} ns per batch, nothing per record")
    print(
        "batch | validate, tracing off | on, sampled (+tracing) | on, unsampled   [CPU us/record]"
    )
    for size in (1, 50, 500):
        sampled, unsampled = records(size, sampled=True), records(size, sampled=False)
        reps = max(5, 2000 // size)
        off = best_ns(NO_TRACING, stage, sampled, reps) / size / 1e3
        yes = best_ns(on, stage, sampled, reps) / size / 1e3
        no = best_ns(on, stage, unsampled, reps) / size / 1e3
        print(
            f"{size:5d} | {off:8.2f} | {yes:8.2f} (+{yes - off:.2f}) | {no:8.2f} (+{no - off:.2f})"
        )
    provider.shutdown()


if __name__ == "__main__":
    main()

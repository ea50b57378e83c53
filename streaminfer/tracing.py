"""OpenTelemetry tracing, switched on by the standard ``OTEL_*`` variables.

Tracing is on when ``OTEL_TRACES_EXPORTER`` names an exporter other than ``none``, or an
OTLP endpoint is set (``OTEL_EXPORTER_OTLP_ENDPOINT`` / ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT``),
and ``OTEL_SDK_DISABLED`` is not ``true`` (read as :class:`TracingSettings`). Then each process
sets up the SDK once: a ``TracerProvider`` (sampler from ``OTEL_TRACES_SAMPLER``, default
parent-based always-on), a batch span processor, and the exporters ``OTEL_TRACES_EXPORTER``
lists (``otlp``, the default, over HTTP/protobuf unless ``OTEL_EXPORTER_OTLP_PROTOCOL=grpc``;
``console``). The SDK reads the other ``OTEL_*`` variables (headers, timeouts, sampler) itself.

With tracing off, :func:`stage_tracer` is the no-op :data:`stages.tracing.NO_TRACING`,
:func:`request_tracer` is None, and the tracing SDK is never imported. The SDK and the OTLP
exporter are the ``tracing`` extra (``pip install 'streaminfer[tracing]'``).
"""

from __future__ import annotations

import importlib
import os
from functools import cache
from typing import TYPE_CHECKING

from stages.tracing import NO_TRACING, RequestTracer, StageTracer
from streaminfer.settings import TracingSettings

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SpanExporter

TRACER_NAME = "streaminfer"


def enabled(config: TracingSettings) -> bool:
    """Whether the ``OTEL_*`` variables ask for traces (see the module docstring)."""
    if config.sdk_disabled:
        return False
    exporters = exporter_names(config)
    if exporters:
        return exporters != ["none"]
    return bool(config.exporter_otlp_endpoint or config.exporter_otlp_traces_endpoint)


def exporter_names(config: TracingSettings) -> list[str]:
    """``OTEL_TRACES_EXPORTER`` as a list (``[]`` when unset)."""
    raw = config.traces_exporter
    return [name.strip().lower() for name in raw.split(",") if name.strip()]


def stage_tracer(config: TracingSettings, stage: str, worker: str) -> StageTracer:
    """The tracer of a stage worker: OpenTelemetry when enabled, else the no-op one."""
    if not enabled(config):
        return NO_TRACING
    from streaminfer.spans import OtelStageTracer

    provider = tracer_provider(config, f"streaminfer-{stage}", worker)
    return OtelStageTracer(tracer=provider.get_tracer(TRACER_NAME), stage=stage)


def request_tracer(config: TracingSettings) -> RequestTracer | None:
    """The tracer of ingest (one root span per request), or None when tracing is off."""
    if not enabled(config):
        return None
    from streaminfer.spans import OtelRequestTracer

    provider = tracer_provider(config, "streaminfer-ingest", f"ingest-{os.getpid()}")
    return OtelRequestTracer(tracer=provider.get_tracer(TRACER_NAME))


@cache
def tracer_provider(config: TracingSettings, service: str, worker: str) -> TracerProvider:
    """The provider of ``service`` in this process, made once. Not installed as the global
    provider: the pipeline's tracers are handed out explicitly, and an ingest and a stage
    in one process (tests) must not fight over it. ``OTEL_SERVICE_NAME`` overrides
    ``service``."""
    try:
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
    except ImportError as exc:  # the SDK is the `tracing` extra, not a dependency
        raise RuntimeError(
            "the OTEL_* variables ask for traces but the OpenTelemetry SDK is not installed: "
            "pip install 'streaminfer[tracing]'"
        ) from exc

    name = config.service_name or service
    resource = Resource.create({"service.name": name, "service.instance.id": worker})
    provider = TracerProvider(resource=resource)  # sampler: OTEL_TRACES_SAMPLER
    for exporter in _exporters(config):
        provider.add_span_processor(BatchSpanProcessor(exporter))
    return provider


def _exporters(config: TracingSettings) -> list[SpanExporter]:
    exporters: list[SpanExporter] = []
    for name in exporter_names(config) or ["otlp"]:
        if name == "otlp":
            exporters.append(_otlp_exporter(config))
        elif name == "console":
            from opentelemetry.sdk.trace.export import ConsoleSpanExporter

            exporters.append(ConsoleSpanExporter())
        elif name != "none":
            raise ValueError(f"OTEL_TRACES_EXPORTER: unknown exporter {name!r} (otlp, console)")
    return exporters


def _otlp_exporter(config: TracingSettings) -> SpanExporter:
    """The endpoint is passed explicitly: the variables may come from ``.env``, which the
    SDK does not read."""
    if config.exporter_otlp_protocol == "grpc":
        # An optional package (not a dependency): imported by name so mypy need not see it.
        try:
            grpc = importlib.import_module("opentelemetry.exporter.otlp.proto.grpc.trace_exporter")
        except ImportError as exc:
            raise RuntimeError(
                "OTEL_EXPORTER_OTLP_PROTOCOL=grpc needs opentelemetry-exporter-otlp-proto-grpc"
            ) from exc
        url = config.exporter_otlp_traces_endpoint or config.exporter_otlp_endpoint
        exporter: SpanExporter = grpc.OTLPSpanExporter(endpoint=url or None)
        return exporter
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import (
        OTLPSpanExporter as HttpExporter,
    )

    url = config.exporter_otlp_traces_endpoint
    if not url and config.exporter_otlp_endpoint:
        url = config.exporter_otlp_endpoint.rstrip("/") + "/v1/traces"
    return HttpExporter(endpoint=url or None)

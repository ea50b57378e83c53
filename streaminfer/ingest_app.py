"""Builds the ingest HTTP app from :class:`Settings` (the only place that does).

``create_app`` is the factory uvicorn imports (``streaminfer.ingest_app:create_app``, with
``factory=True``), once per worker process; the ``ingest`` package itself never reads
settings.
"""

from __future__ import annotations

import redis.asyncio as aioredis
from confluent_kafka import Consumer
from fastapi import FastAPI

from ingest.app import HttpConfig
from ingest.app import create_app as create_http_app
from ingest.dlq_watcher import DlqWatcher
from ingest.metrics import IngestMetrics, multiprocess_registry
from ingest.oip_grpc import GrpcConfig
from ingest.oip_http import OipDoor
from ingest.payloads import RequestDecoder
from ingest.service import IngestService, ServiceConfig
from schemas.keys import ResultKeys
from streaminfer.kafka import make_consumer, make_producer
from streaminfer.monitoring import multiprocess_metrics_dir
from streaminfer.settings import Settings
from streaminfer.tracing import request_tracer
from streaminfer.wiring import model_catalog

FACTORY = "streaminfer.ingest_app:create_app"


def create_app(settings: Settings | None = None) -> FastAPI:
    """The ingest app for ``settings`` (default: read from the environment)."""
    settings = settings or Settings()
    config = http_config(settings)
    # The Open Inference Protocol (v2): HTTP routes on this app, gRPC beside it when asked.
    oip = OipDoor(
        config,
        catalog=model_catalog(settings),
        max_rows=settings.ingest.max_batch_records,
        grpc=grpc_config(settings),
    )
    app = create_http_app(
        config,
        service_factory=lambda metrics: build_service(settings, metrics),
        companions=[oip.companion],
    )
    oip.mount(app)
    shared = multiprocess_metrics_dir(settings)
    if shared is not None:  # `ingest --workers N`: /metrics adds up every worker's values
        app.state.registry = multiprocess_registry(shared)
    return app


def http_config(settings: Settings) -> HttpConfig:
    ingest = settings.ingest
    default_tenant = settings.kafka.default_tenant
    return HttpConfig(
        max_body_bytes=ingest.max_body_bytes,
        predict_timeout_s=ingest.predict_timeout_s,
        predict_max_timeout_s=ingest.predict_max_timeout_s,
        busy_retry_after_s=ingest.busy_retry_after_s,
        unavailable_retry_after_s=ingest.unavailable_retry_after_s,
        default_tenant=default_tenant,
        api_keys=ingest.api_key_tenants(default_tenant),
        public_docs=ingest.public_docs,
    )


def grpc_config(settings: Settings) -> GrpcConfig | None:
    """The gRPC door's config; None when ``ingest.grpc_port`` is unset."""
    ingest = settings.ingest
    if ingest.grpc_port is None:
        return None
    default_tenant = settings.kafka.default_tenant
    return GrpcConfig(
        host=ingest.host,
        port=ingest.grpc_port,
        default_tenant=default_tenant,
        api_keys=ingest.api_key_tenants(default_tenant),
        max_message_bytes=ingest.max_body_bytes,
    )


def service_config(settings: Settings) -> ServiceConfig:
    return ServiceConfig(
        requests_topic=settings.topics.requests,
        dlq_topic=settings.topics.dlq,
        keys=ResultKeys(prefix=settings.kafka.topic_prefix),
        delivery_timeout_s=settings.ingest.delivery_timeout_s,
        probe_timeout_s=settings.ingest.probe_timeout_s,
        queue_max_records=settings.ingest.queue_max_records,
    )


def build_service(settings: Settings, metrics: IngestMetrics) -> IngestService:
    """An :class:`IngestService` with its clients built from ``settings``."""
    ingest = settings.ingest
    kafka = make_producer(
        settings,
        **{
            "linger.ms": ingest.linger_ms,
            "delivery.timeout.ms": int(ingest.delivery_timeout_s * 1000),
            "queue.buffering.max.messages": ingest.queue_max_records,
        },
    )
    catalog = model_catalog(settings) if ingest.check_models else None
    decoder = RequestDecoder(
        catalog=catalog,
        max_batch=ingest.max_batch_records,
        message_max_bytes=settings.kafka.message_max_bytes,
    )
    redis_client = aioredis.Redis.from_url(
        settings.redis.url.get_secret_value(),
        socket_connect_timeout=ingest.probe_timeout_s,
        socket_timeout=ingest.probe_timeout_s,
    )
    return IngestService(
        config=service_config(settings),
        default_tenant=settings.kafka.default_tenant,
        decoder=decoder,
        kafka=kafka,
        redis_client=redis_client,
        dlq_consumer=lambda: dlq_consumer(settings),
        metrics=metrics,
        tracer=request_tracer(settings.tracing),  # None unless OTEL_* asks for traces
    )


def dlq_consumer(settings: Settings) -> Consumer:
    """The DLQ watcher's consumer: a group of its own per process, from the latest records."""
    return make_consumer(
        settings,
        group_id=DlqWatcher.group_id(settings.kafka.topic_prefix),
        **{"partition.assignment.strategy": "range", "auto.offset.reset": "latest"},
    )

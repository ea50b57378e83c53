"""Builds a stage and its runner from :class:`Settings` (the only place that does)."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from contextlib import AbstractContextManager, ExitStack, contextmanager
from functools import partial
from typing import Final, Literal

import redis
from confluent_kafka import Consumer, Producer
from prometheus_client import CollectorRegistry, ProcessCollector, start_http_server

from schemas.keys import ResultKeys
from schemas.models import ModelCatalog
from sinks.redis_store import ResultStore
from stages.committers import AtLeastOnceCommitter, Committer, TransactionalCommitter
from stages.control import ControlPlane, follow_new_versions
from stages.dlq import DOWNSTREAM_REASONS, PIPELINE_REASONS, DlqBudget
from stages.fleet import ModelFleet
from stages.infer import InferStage
from stages.metrics import NullMetrics, PrometheusStageMetrics, StageMetrics
from stages.models import ModelRegistry, SessionOptions
from stages.persist import PersistStage
from stages.plugins import StageProcessors
from stages.priority import DownstreamBacklog, PriorityGate
from stages.runtime import Stage, StageRunner
from stages.tracing import NO_TRACING, StageTracer
from stages.validate import ValidateStage
from streaminfer.kafka import make_consumer, make_producer, transactional_producer_config
from streaminfer.settings import Settings
from streaminfer.tracing import stage_tracer

StageName = Literal["validate", "infer", "persist"]
STAGE_NAMES: Final[tuple[StageName, ...]] = ("validate", "infer", "persist")


def input_topics(settings: Settings, name: StageName) -> list[str]:
    topics = settings.topics
    return {
        "validate": [topics.requests, topics.requests_backfill],
        "infer": [topics.validated],
        "persist": [topics.results],
    }[name]


def model_catalog(settings: Settings) -> ModelCatalog:
    """The model contracts alone (no ONNX Runtime sessions): enough to validate requests."""
    return ModelCatalog(settings.stage.models_dir)


def model_registry(settings: Settings) -> ModelRegistry:
    options = SessionOptions(
        intra_op_threads=settings.stage.onnx_intra_op_threads,
        allow_spinning=settings.stage.onnx_allow_spinning,
    )
    return ModelRegistry(root=settings.stage.models_dir, session_options=options)


def result_store(settings: Settings) -> ResultStore:
    # Timeouts turn a hung Redis into an error the persist stage retries (pausing its
    # partitions) instead of a call that blocks past max.poll.interval.ms.
    client = redis.Redis.from_url(
        settings.redis.url.get_secret_value(), socket_timeout=5, socket_connect_timeout=5
    )
    return ResultStore(
        client=client,
        ttl_s=settings.redis.result_ttl_s,
        keys=ResultKeys(prefix=settings.kafka.topic_prefix),
    )


def control_plane(settings: Settings) -> ControlPlane:
    """A reader of the control plane: its own consumer, no group (it assigns, never joins)."""
    group = f"{settings.kafka.topic_prefix}streaminfer.control.{uuid.uuid4().hex[:12]}"
    return ControlPlane(
        consumer_factory=lambda: make_consumer(settings, group_id=group),
        topic=settings.topics.models,
    )


def model_fleet(settings: Settings) -> ModelFleet:
    return ModelFleet(registry=model_registry(settings), control=control_plane(settings))


def build_stage(
    settings: Settings,
    name: StageName,
    metrics: StageMetrics,
    *,
    fleet: ModelFleet | None = None,
    control: ControlPlane | None = None,
) -> Stage:
    """Stage ``name``; validate checks explicit versions against ``control``, infer serves
    ``fleet`` (both follow the control plane while their runner runs)."""
    topics = settings.topics
    if name == "validate":
        catalog = model_catalog(settings)
        if control is not None:
            follow_new_versions(control, catalog)
        return ValidateStage(
            catalog=catalog,
            output_topic=topics.validated,
            loaded_versions=control.loaded_versions if control is not None else None,
            processors=StageProcessors("validate", metrics=metrics),
        )
    if name == "infer":
        return InferStage(
            fleet=fleet or ModelFleet(registry=model_registry(settings)),
            output_topic=topics.results,
            shadow_topic=topics.shadow,
            metrics=metrics,
        )
    return PersistStage(
        store=result_store(settings),
        output_topic=topics.stored,
        default_tenant=settings.kafka.default_tenant,
        metrics=metrics,
    )


def stage_metrics(settings: Settings, name: StageName, slot: int) -> StageMetrics:
    """Prometheus metrics served on ``metrics_port + slot`` when a port is set."""
    if settings.stage.metrics_port is None:
        return NullMetrics()
    registry = CollectorRegistry()
    ProcessCollector(registry=registry)  # process_start_time_seconds: restarts show
    start_http_server(
        settings.stage.metrics_port + slot, addr=settings.stage.metrics_host, registry=registry
    )
    return PrometheusStageMetrics(stage=name, registry=registry)


def build_runner(settings: Settings, name: StageName, *, slot: int = 0) -> StageRunner:
    """One consumer-group member of stage ``name``: its consumer, producer and stage."""
    metrics = stage_metrics(settings, name, slot)
    tracer = stage_tracer(settings.tracing, name, worker=settings.transactional_id(name, slot))
    consumer = make_consumer(
        settings, group_id=settings.group_id(name), **static_member(settings, name, slot)
    )
    gate = priority_gate(settings, name)
    backlog = None
    if gate is not None and settings.priority.max_downstream > 0:
        backlog = downstream_backlog(settings, interval_s=settings.priority.poll_interval_s)
    fleet = model_fleet(settings) if name == "infer" else None
    control = control_plane(settings) if name == "validate" else None
    models = fleet.running() if fleet else control.running() if control else None
    return StageRunner(
        stage=build_stage(settings, name, metrics, fleet=fleet, control=control),
        consumer=consumer,
        committer=make_committer(
            settings, name, slot=slot, consumer=consumer, metrics=metrics, tracer=tracer
        ),
        input_topics=input_topics(settings, name),
        dlq_topic=settings.topics.dlq,
        batch_size=settings.stage.batch_max_records,
        batch_timeout_s=settings.stage.batch_timeout_s
        if fleet is None
        else partial(fleet.batch_timeout_s, settings.stage.batch_timeout_s),
        max_record_bytes=settings.kafka.message_max_bytes,
        dlq_budget=DlqBudget(
            stage=name,
            # validate finds every client error; after it, malformed input is a pipeline bug.
            counted_reasons=PIPELINE_REASONS if name == "validate" else DOWNSTREAM_REASONS,
            max_ratio=settings.stage.dlq_max_ratio,
            window=settings.stage.dlq_window_records,
            min_records=settings.stage.dlq_min_records,
        ),
        metrics=metrics,
        priority=gate,
        # The downstream reading thread runs exactly as long as the runner.
        downstream=backlog.reading if backlog is not None else lambda: None,
        running=all_running(
            backlog.running(lambda: gate.admitted) if backlog and gate else None, models
        ),
        tracer=tracer,
    )


@contextmanager
def all_running(*contexts: AbstractContextManager[object] | None) -> Iterator[None]:
    """Enter every context given (for as long as the runner runs), in order."""
    with ExitStack() as stack:
        for context in contexts:
            if context is not None:
                stack.enter_context(context)
        yield


def static_member(settings: Settings, name: StageName, slot: int) -> dict[str, str]:
    """Static group membership (KIP-345): the worker slot's stable name, the one its
    transactional.id uses, as ``group.instance.id``. A restarted worker then takes its
    partitions back without a rebalance; one stopped for good keeps them unassigned until
    ``session.timeout.ms`` (static members do not leave the group on close)."""
    if not settings.stage.static_membership:
        return {}
    return {"group.instance.id": settings.transactional_id(name, slot)}


def priority_gate(settings: Settings, name: StageName) -> PriorityGate | None:
    """validate serves live requests first: backfill waits while they have a backlog, and
    while infer and persist have ``priority_max_downstream`` records or more to do (that
    reading is :func:`downstream_backlog`, given to the runner by :func:`build_runner`)."""
    if name != "validate":
        return None
    return PriorityGate(
        live_topics=[settings.topics.requests],
        bulk_topics=[settings.topics.requests_backfill],
        max_live_lag=settings.priority.max_live_lag,
        max_downstream=settings.priority.max_downstream,
        max_downstream_idle=settings.priority.max_downstream_idle,
        live_idle_s=settings.priority.live_idle_s,
    )


def downstream_backlog(settings: Settings, *, interval_s: float) -> DownstreamBacklog:
    """Reads what infer and persist have still to do: their groups' lag on their inputs."""
    watch = [
        (settings.group_id("infer"), settings.topics.validated),
        (settings.group_id("persist"), settings.topics.results),
    ]
    # Plain consumers that only read the groups' committed offsets and the topics' end
    # offsets: never subscribed, so they never join the groups.
    readers = {
        group: make_consumer(settings, group_id=group, **{"isolation.level": "read_uncommitted"})
        for group, _topic in watch
    }
    return DownstreamBacklog(consumers=readers, watch=watch, interval_s=interval_s)


def make_committer(
    settings: Settings,
    name: StageName,
    *,
    slot: int,
    consumer: Consumer,
    metrics: StageMetrics | None = None,
    tracer: StageTracer = NO_TRACING,
) -> Committer:
    """Transactions between Kafka stages in exactly-once mode. Persist is always
    at-least-once: Redis cannot join a Kafka transaction, and its writes are idempotent."""
    if settings.stage.processing_guarantee == "exactly-once" and name != "persist":
        config = transactional_producer_config(
            settings, transactional_id=settings.transactional_id(name, slot)
        )
        return TransactionalCommitter(
            producer_factory=lambda: Producer(config),
            consumer=consumer,
            max_records=settings.stage.txn_max_records,
            max_interval_s=settings.stage.txn_max_interval_s,
            timeout_s=settings.kafka.delivery_timeout_s,
            metrics=metrics,
            tracer=tracer,
        )
    return AtLeastOnceCommitter(
        producer=make_producer(settings),
        consumer=consumer,
        delivery_timeout_s=settings.kafka.delivery_timeout_s,
        tracer=tracer,
    )

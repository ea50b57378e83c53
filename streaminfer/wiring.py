"""Builds a stage and its runner from :class:`Settings` (the only place that does).

Two topologies (``STREAMINFER_STAGE_TOPOLOGY``, README "Topologies"): ``split`` runs validate,
infer and persist as three consumer groups linked by Kafka topics; ``fused`` runs one group,
``fused`` (:mod:`stages.fused`), that does all three on each batch.
"""

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
from stages.fused import FusedStage
from stages.infer import InferStage
from stages.metrics import NullMetrics, PrometheusStageMetrics, StageMetrics
from stages.models import ModelRegistry, SessionOptions
from stages.persist import PersistStage
from stages.plugins import StageProcessors
from stages.priority import DownstreamBacklog, PriorityGate
from stages.runtime import Stage, StageRunner
from stages.tracing import NO_TRACING, StageTracer
from stages.validate import ValidateStage
from streaminfer.kafka import make_consumer, stage_producer_config, transactional_producer_config
from streaminfer.settings import Settings
from streaminfer.tracing import stage_tracer

StageName = Literal["validate", "infer", "persist", "fused"]
# The split topology's stages, in pipeline order.
STAGE_NAMES: Final[tuple[StageName, ...]] = ("validate", "infer", "persist")
# The fused topology's one stage.
FUSED_STAGES: Final[tuple[StageName, ...]] = ("fused",)
# Every stage `streaminfer stage NAME` runs.
ALL_STAGE_NAMES: Final[tuple[StageName, ...]] = (*STAGE_NAMES, *FUSED_STAGES)


def topology_stages(settings: Settings) -> tuple[StageName, ...]:
    """The stages the configured topology runs."""
    return FUSED_STAGES if settings.stage.topology == "fused" else STAGE_NAMES


def input_topics(settings: Settings, name: StageName) -> list[str]:
    topics = settings.topics
    return {
        "validate": [topics.requests, topics.requests_backfill],
        "infer": [topics.validated],
        "persist": [topics.results],
        "fused": [topics.requests, topics.requests_backfill],
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


def model_fleet(settings: Settings, control: ControlPlane | None = None) -> ModelFleet:
    """The models served, following ``control`` (default: a control plane of its own)."""
    return ModelFleet(registry=model_registry(settings), control=control or control_plane(settings))


def build_stage(
    settings: Settings,
    name: StageName,
    metrics: StageMetrics,
    *,
    fleet: ModelFleet | None = None,
    control: ControlPlane | None = None,
) -> Stage:
    """Stage ``name``; validate checks explicit versions against ``control``, infer serves
    ``fleet`` (both follow the control plane while their runner runs); fused does both."""
    if name == "validate":
        return validate_stage(settings, metrics, control)
    if name == "infer":
        return infer_stage(settings, metrics, fleet)
    if name == "persist":
        return persist_stage(settings, metrics)
    return FusedStage(
        validate=validate_stage(settings, metrics, control),
        infer=infer_stage(settings, metrics, fleet),
        persist=persist_stage(settings, metrics),
        results_topic=settings.topics.results,
        max_record_bytes=settings.kafka.message_max_bytes,
    )


def validate_stage(
    settings: Settings, metrics: StageMetrics, control: ControlPlane | None
) -> ValidateStage:
    catalog = model_catalog(settings)
    if control is not None:
        follow_new_versions(control, catalog)
    return ValidateStage(
        catalog=catalog,
        output_topic=settings.topics.validated,
        loaded_versions=control.loaded_versions if control is not None else None,
        processors=StageProcessors("validate", metrics=metrics),
    )


def infer_stage(settings: Settings, metrics: StageMetrics, fleet: ModelFleet | None) -> InferStage:
    return InferStage(
        fleet=fleet or ModelFleet(registry=model_registry(settings)),
        output_topic=settings.topics.results,
        shadow_topic=settings.topics.shadow,
        metrics=metrics,
    )


def persist_stage(settings: Settings, metrics: StageMetrics) -> PersistStage:
    return PersistStage(
        store=result_store(settings),
        output_topic=settings.topics.stored,
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
        settings,
        group_id=settings.group_id(name),
        **static_member(settings, name, slot),
        **{"partition.assignment.strategy": assignment_strategy(settings, name)},
    )
    gate = priority_gate(settings, name)
    watch = downstream_watch(settings, name)
    backlog = None
    if gate is not None and watch and settings.priority.max_downstream > 0:
        interval_s = settings.priority.poll_interval_s
        backlog = downstream_backlog(settings, interval_s=interval_s, watch=watch)
    # fused: one control plane, read by validate's version check and infer's fleet alike.
    control = control_plane(settings) if name in ("validate", "fused") else None
    fleet = model_fleet(settings, control) if name in ("infer", "fused") else None
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
            counted_reasons=counted_reasons(name),
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
        rejoin_timeout_s=settings.stage.rejoin_timeout_s,
    )


@contextmanager
def all_running(*contexts: AbstractContextManager[object] | None) -> Iterator[None]:
    """Enter every context given (for as long as the runner runs), in order."""
    with ExitStack() as stack:
        for context in contexts:
            if context is not None:
                stack.enter_context(context)
        yield


def counted_reasons(name: StageName) -> frozenset[str]:
    """The dead-letter reasons :class:`DlqBudget` counts as pipeline faults for ``name``:
    validate finds every client error; after it, malformed input is a pipeline bug. fused
    starts with validate, so its malformed records are the client's; its too-large ones
    are model outputs over the limit (it produces no validated copy of a request)."""
    if name == "validate":
        return PIPELINE_REASONS
    if name == "fused":
        return PIPELINE_REASONS | {"too_large"}
    return DOWNSTREAM_REASONS


def assignment_strategy(settings: Settings, name: StageName) -> str:
    """``range`` for the stages that read two topics (validate and fused: live requests and
    backfill), ``cooperative-sticky`` for the others.

    The sticky assignor balances the number of partitions per member, not per topic: with
    two members, measured on the broker, one got all four partitions of
    ``inference.requests`` and the other all four of the backfill topic, so a second
    validate (or fused) process served no live request and live traffic did not scale
    (bench: the second fused process at 0-1 % CPU). ``range`` splits each topic across the
    members. Its price is the eager protocol: a rebalance revokes every partition of the
    group for a moment (the runner commits on revoke, so nothing is replayed). A group
    cannot mix the two protocols: upgrading a running validate or fused group past this
    change means stopping all its members first (README: Operations)."""
    chosen = settings.kafka.consumer_extra.get("partition.assignment.strategy")
    if chosen is not None:  # the operator's choice stands
        return str(chosen)
    return "range" if len(input_topics(settings, name)) > 1 else "cooperative-sticky"


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
    reading is :func:`downstream_backlog`, given to the runner by :func:`build_runner`).

    fused has the same gate; it is never given a downstream reading
    (:func:`downstream_watch`), so only the live rule applies."""
    if name not in ("validate", "fused"):
        return None
    return PriorityGate(
        live_topics=[settings.topics.requests],
        bulk_topics=[settings.topics.requests_backfill],
        max_live_lag=settings.priority.max_live_lag,
        max_downstream=settings.priority.max_downstream,
        max_downstream_idle=settings.priority.max_downstream_idle,
        live_idle_s=settings.priority.live_idle_s,
    )


def downstream_watch(settings: Settings, name: StageName) -> list[tuple[str, str]]:
    """The (group, topic) pairs whose lag is what ``name``'s gate calls downstream: infer's
    and persist's inputs for validate. None for fused: there is no queue between its steps,
    a live request waits behind at most the batch in hand. (Its own group's lag is no
    substitute: the backfill's lag is most of it, by design, and would hold it forever.)"""
    if name != "validate":
        return []
    return [
        (settings.group_id("infer"), settings.topics.validated),
        (settings.group_id("persist"), settings.topics.results),
    ]


def downstream_backlog(
    settings: Settings, *, interval_s: float, watch: list[tuple[str, str]] | None = None
) -> DownstreamBacklog:
    """Reads what the stages after validate have still to do: the lag of ``watch``
    (default: validate's :func:`downstream_watch`)."""
    watch = watch if watch is not None else downstream_watch(settings, "validate")
    # Plain consumers that only read the groups' committed offsets and the topics' end
    # offsets: never subscribed, so they never join the groups. The first hop's end offsets
    # include open transactions (read_uncommitted: what validate has produced but not
    # committed yet is on its way downstream). Later hops' do not (read_committed: the last
    # stable offset): a record in infer's open transaction is still in infer's lag, and
    # counting its output on the next topic as well counted it twice, a commit's worth of
    # phantom backlog (measured: spikes of 800-1,400 while the real backlog was ~300).
    readers = {
        group: make_consumer(
            settings,
            group_id=group,
            **{"isolation.level": "read_uncommitted" if hop == 0 else "read_committed"},
        )
        for hop, (group, _topic) in enumerate(watch)
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
    at-least-once: Redis cannot join a Kafka transaction, and its writes are idempotent.
    fused is transactional like validate and infer: its results, stored notices, dead
    letters and offsets commit together (its Redis writes come first; see stages.fused)."""
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
            commit_on_drain=settings.stage.txn_commit_on_drain,
            metrics=metrics,
            tracer=tracer,
        )
    return AtLeastOnceCommitter(
        producer=Producer(stage_producer_config(settings)),
        consumer=consumer,
        delivery_timeout_s=settings.kafka.delivery_timeout_s,
        commit_async=settings.stage.commit_async,
        tracer=tracer,
    )

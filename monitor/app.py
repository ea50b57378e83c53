"""The faust wiring of the monitor: the only module that imports faust.

Two agents::

    inference.results ┐
    inference.stored  ├─ observe ─► <app id>.observations ─ aggregate ─► window tables
    inference.dlq     ┘  (decode a     (internal, 1 partition:    (faust tumbling tables,
                          batch, count  one partial window per     one per window size)
                          it per model  model version and smallest        │ on window close
                          version and   window of the batch)              ▼
                          window)              inference.stats (compacted) + /metrics gauges

Why the hop through a one-partition topic: a faust windowed table closes each window once per
*table*, not per key (``Collection.last_closed_window``), so windows of one key updated from
several partitions of a source topic would be closed once and then dropped. With a single
partition every update of every key is in one ordered stream and the tables are exact; since
the observing agent counts each batch before sending, that stream carries a few partial windows
per batch, not one message per record. Run one monitor worker per deployment (a second one
would share the decoding of the source partitions, never the aggregation; not tested).

Windows are on the records' Kafka timestamps (``relative_to_stream``) and close ``grace_s``
after their end by the wall clock (faust's table cleanup, every second here), so a window
closes even when traffic stops. A record that arrives after its window closed is not counted.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, cast

import faust
from faust.streams import Stream
from faust.types import EventT, StreamT, TopicT
from prometheus_client import CollectorRegistry, start_http_server

from monitor.gauges import MonitorGauges
from monitor.observe import observe
from monitor.records import (
    STATS_SCHEMA,
    UNKNOWN,
    Observation,
    WindowStatsV1,
    decode_partial,
    decode_state,
    encode,
)
from monitor.stats import check_sizes, merge, partials, summarize, window_name
from monitor.training import TrainingDistributions
from schemas.headers import Headers
from schemas.topics import Topics

log = logging.getLogger(__name__)
_SEP = "\x1f"  # between model and version in a table key (neither name can hold it)
# The observing agent counts records in batches of up to this many, or what came within this.
BATCH_MAX = 2000
BATCH_WITHIN_S = 0.2


@dataclass(frozen=True, kw_only=True)
class MonitorOptions:
    """Everything the monitor needs; ``streaminfer monitor`` builds it from the settings."""

    bootstrap_servers: str
    topics: Topics
    app_id: str  # consumer group, and the prefix of the monitor's own topics
    models_dir: Path
    data_dir: Path  # faust's working files
    metrics_host: str = "127.0.0.1"
    metrics_port: int = 9390
    windows_s: tuple[int, ...] = (10, 60)
    grace_s: float = 2.0
    min_drift_results: int = 50
    from_beginning: bool = False
    replication_factor: int = 1


@dataclass(frozen=True)
class Monitor:
    app: faust.App
    gauges: MonitorGauges
    registry: CollectorRegistry


def build(options: MonitorOptions) -> Monitor:
    """The faust app with its topics, tables and agents (nothing runs yet)."""
    registry = CollectorRegistry()
    gauges = MonitorGauges(registry)
    training = TrainingDistributions(options.models_dir)
    app = _app(options)
    observations = app.topic(
        f"{options.app_id}.observations",
        partitions=1,
        internal=True,
        key_type=bytes,
        value_type=bytes,
        key_serializer="raw",
        value_serializer="raw",
        retention=timedelta(hours=1),  # a transient stream: the tables hold the state
    )
    stats = app.topic(
        options.topics.stats, partitions=1, internal=True, compacting=True,
        key_type=bytes, value_type=bytes, key_serializer="raw", value_serializer="raw",
    )  # fmt: skip
    sources = app.topic(
        options.topics.results,
        options.topics.stored,
        options.topics.dlq,
        key_type=bytes,
        value_type=bytes,
        key_serializer="raw",
        value_serializer="raw",
    )
    publish = _publisher(stats, gauges)
    tables = {
        size: _window_table(app, options, size, _closer(options, size, training, publish))
        for size in options.windows_s
    }
    app.agent(sources, name="observe")(_observer(options, observations, gauges, training))
    app.agent(observations, name="aggregate")(_aggregator(tables))
    return Monitor(app=app, gauges=gauges, registry=registry)


def _app(options: MonitorOptions) -> faust.App:
    brokers = ";".join(f"kafka://{s.strip()}" for s in options.bootstrap_servers.split(","))
    return faust.App(
        options.app_id,
        broker=brokers,
        store="memory://",  # rebuilt from the tables' changelogs on start
        datadir=str(options.data_dir),
        web_enabled=False,
        topic_partitions=1,
        topic_replication_factor=options.replication_factor,
        table_cleanup_interval=1.0,  # how often closed windows are looked for
        consumer_auto_offset_reset="earliest" if options.from_beginning else "latest",
        processing_guarantee="at_least_once",
        autodiscover=False,
    )


def _window_table(
    app: faust.App,
    options: MonitorOptions,
    size: int,
    on_close: Callable[[Any, Any], Coroutine[Any, Any, None]],
) -> Any:
    table = app.Table(
        f"window-{window_name(size)}",
        default=bytes,
        key_type=str,
        value_type=bytes,
        partitions=1,
        on_window_close=on_close,
    )
    return table.tumbling(size, expires=timedelta(seconds=options.grace_s)).relative_to_stream()


def _observer(
    options: MonitorOptions,
    observations: TopicT,
    gauges: MonitorGauges,
    training: TrainingDistributions,
) -> Callable[[StreamT[bytes]], Coroutine[Any, Any, None]]:
    kinds = {options.topics.results: "result", options.topics.stored: "stored"}
    smallest = check_sizes(options.windows_s)

    async def observe_records(stream: StreamT[bytes]) -> None:
        batches = cast(Stream[bytes], stream).take_events(BATCH_MAX, within=BATCH_WITHIN_S)
        async for events in batches:
            seen = []
            for event in events:
                kind = kinds.get(event.message.topic, "dead_letter")
                one = _observation(options.topics, event, training)
                gauges.observed.labels(kind, "unreadable" if one is None else "observed").inc()
                if one is not None:
                    seen.append(one)
            for partial in partials(seen, smallest):
                key = f"{partial.model}{_SEP}{partial.version}".encode()
                await observations.send(key=key, value=encode(partial), timestamp=partial.at)

    return observe_records


def _observation(
    topics: Topics, event: EventT[bytes], training: TrainingDistributions
) -> Observation | None:
    message = event.message
    seen = observe(
        topics, topic=message.topic, value=event.value, headers=message.headers,
        at=message.timestamp,
    )  # fmt: skip
    if seen is None or seen.kind != "dead_letter":
        return seen
    # A dead letter's names are whatever a client sent: only real ones become labels.
    model = seen.model if training.knows(seen.model) else UNKNOWN
    version = seen.version if model != UNKNOWN and training.knows(model, seen.version) else UNKNOWN
    return Observation(kind="dead_letter", model=model, version=version, at=seen.at,
                       reason=seen.reason)  # fmt: skip


def _aggregator(tables: dict[int, Any]) -> Callable[[StreamT[bytes]], Coroutine[Any, Any, None]]:
    async def aggregate(stream: StreamT[bytes]) -> None:
        async for value in stream:
            partial = decode_partial(value)
            key = f"{partial.model}{_SEP}{partial.version}"
            for table in tables.values():
                # the window of this record's timestamp (relative_to_stream)
                state = decode_state(table[key].current())
                merge(state, partial.state)
                table[key] = encode(state)

    return aggregate


def _closer(
    options: MonitorOptions,
    size: int,
    training: TrainingDistributions,
    publish: Callable[[WindowStatsV1], Coroutine[Any, Any, None]],
) -> Callable[[Any, Any], Coroutine[Any, Any, None]]:
    async def on_window_close(key: Any, value: Any) -> None:
        table_key, (start, _end) = key
        model, _, version = str(table_key).partition(_SEP)
        closed = summarize(
            decode_state(value),
            model=model,
            version=version,
            size_s=size,
            start=float(start),
            training=training.get(model, version),
            min_results=options.min_drift_results,
            closed_at=time.time(),
        )
        await publish(closed)

    return on_window_close


def _publisher(
    stats: TopicT, gauges: MonitorGauges
) -> Callable[[WindowStatsV1], Coroutine[Any, Any, None]]:
    headers = {Headers.CONTENT_TYPE: Headers.MSGPACK, Headers.SCHEMA: STATS_SCHEMA.encode()}

    async def publish(closed: WindowStatsV1) -> None:
        gauges.publish(closed)
        await stats.send(key=closed.key.encode(), value=encode(closed), headers=headers)
        log.info(
            "window %s %s/%s: %d results, drift %s",
            closed.window, closed.model, closed.model_version, closed.requests, closed.drift_psi,
        )  # fmt: skip

    return publish


def run(options: MonitorOptions, *, loglevel: str = "info") -> int:
    """Serve the gauges on ``metrics_host:metrics_port`` and run the app until SIGTERM/SIGINT."""
    monitor = build(options)
    options.data_dir.mkdir(parents=True, exist_ok=True)
    start_http_server(options.metrics_port, options.metrics_host, registry=monitor.registry)
    log.info("monitor: /metrics on %s:%d", options.metrics_host, options.metrics_port)
    worker = faust.Worker(monitor.app, loglevel=loglevel, quiet=True, workdir=options.data_dir)
    worker.execute_from_commandline()
    return 0  # pragma: no cover (execute_from_commandline exits)

"""``streaminfer status``: the pipeline on one screen (rich).

:func:`collect` takes a :class:`Snapshot` from the live system; :func:`render` draws one,
so the screen is tested from a made-up snapshot. A snapshot holds:

* the local processes (the plain lines of :func:`streaminfer.stack.status`);
* Kafka and Redis health (brokers and controller; Redis ping time and memory);
* per stage of the configured topology: its group's state and members (client id, host,
  partitions owned), its lag (end offsets of its input topics minus the group's committed
  offsets), and its rates, from two samples ``interval_s`` apart: ``in/s`` = records the
  group committed per second, ``out/s`` = growth of its output topic's end offsets per
  second (transaction markers count there, so with exactly-once at a trickle it reads a
  little high);
* dead letters of the last minute by stage and reason (Kafka's time index finds where the
  minute starts; at most :data:`DLQ_READ_LIMIT` records are read);
* each model's routing and shares from the control topic ``inference.models``, when it
  exists.

Every probe fails on its own: an unreachable Redis shows as unhealthy, it does not stop
the screen.
"""

from __future__ import annotations

import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Final, TypeVar

import redis
from confluent_kafka import Consumer, ConsumerGroupTopicPartitions, TopicPartition
from confluent_kafka.admin import AdminClient
from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.table import Table
from rich.text import Text

from kafkaio.dead_letters import read_dead_letter
from kafkaio.offsets import end_offsets, offsets_at
from streaminfer.kafka import make_admin, make_consumer
from streaminfer.settings import Settings
from streaminfer.wiring import StageName, input_topics, topology_stages

TIMEOUT_S: Final = 5.0
DLQ_WINDOW_S: Final = 60.0
DLQ_READ_LIMIT: Final = 100_000
T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class Member:
    client_id: str
    host: str
    partitions: int


@dataclass(frozen=True, slots=True)
class StageStatus:
    name: str
    group: str
    state: str
    members: list[Member]
    lag: int | None
    in_rate: float | None = None
    out_rate: float | None = None
    error: str = ""


@dataclass(frozen=True, slots=True)
class Health:
    name: str
    ok: bool
    detail: str


@dataclass(frozen=True, slots=True)
class ModelRouting:
    model: str
    revision: int
    shares: dict[str, float]  # version -> fraction of requests that name no version
    loaded: list[str]
    shadow: str | None


@dataclass(frozen=True, slots=True)
class Snapshot:
    taken_at: float
    processes: list[str]
    health: list[Health]
    stages: list[StageStatus]
    dead_letters: dict[tuple[str, str], int]  # (stage, reason) -> records in the window
    models: list[ModelRouting] | None  # None: no control topic
    notes: list[str] = field(default_factory=list)  # probes that failed, and why


# -- collecting ------------------------------------------------------------------------------


def collect(settings: Settings, *, interval_s: float = 1.0) -> Snapshot:
    """A snapshot of the live system; rates come from two samples ``interval_s`` apart."""
    from streaminfer import stack

    notes: list[str] = []
    admin = make_admin(settings)
    consumer = make_consumer(settings, group_id=f"streaminfer.status.{uuid.uuid4().hex[:8]}")
    try:
        health = [_kafka_health(admin), _redis_health(settings)]
        stages: list[StageStatus] = []
        dead: dict[tuple[str, str], int] = {}
        models: list[ModelRouting] | None = None
        if health[0].ok:  # every Kafka probe would only wait out its timeout
            stages = _probe(
                notes, "stages", lambda: _stages(settings, admin, consumer, interval_s), []
            )
            dead = _probe(notes, "dead letters", lambda: _dead_letters(settings, consumer), {})
            models = _probe(notes, "models", lambda: _models(settings, consumer), None)
    finally:
        consumer.close()
    processes: list[str] = _probe(notes, "processes", lambda: stack.status(settings), [])
    return Snapshot(time.time(), processes, health, stages, dead, models, notes)


def _probe(notes: list[str], what: str, probe: Callable[[], T], fallback: T) -> T:
    try:
        return probe()
    except Exception as exc:  # one probe failing must not blank the screen
        notes.append(f"{what}: {type(exc).__name__}: {exc}")
        return fallback


def _kafka_health(admin: AdminClient) -> Health:
    try:
        meta = admin.list_topics(timeout=TIMEOUT_S)
    except Exception as exc:
        return Health("kafka", False, f"unreachable: {exc}")
    brokers = ", ".join(f"{b.id}@{b.host}:{b.port}" for b in meta.brokers.values())
    return Health("kafka", True, f"brokers {brokers}; controller {meta.controller_id}")


def _redis_health(settings: Settings) -> Health:
    client = redis.Redis.from_url(
        settings.redis.url.get_secret_value(), socket_timeout=2, socket_connect_timeout=2
    )
    try:
        started = time.perf_counter()
        client.ping()
        ms = (time.perf_counter() - started) * 1000
        memory = client.info("memory").get("used_memory_human", "?")
        return Health("redis", True, f"ping {ms:.1f} ms; memory {memory}")
    except Exception as exc:
        return Health("redis", False, f"unreachable: {exc}")
    finally:
        client.close()


def output_topic(settings: Settings, name: StageName) -> str:
    """The topic whose growth is the stage's ``out/s`` (fused: its results)."""
    topics = settings.topics
    return {
        "validate": topics.validated,
        "infer": topics.results,
        "persist": topics.stored,
        "fused": topics.results,
    }[name]


def _stages(
    settings: Settings, admin: AdminClient, consumer: Consumer, interval_s: float
) -> list[StageStatus]:
    names = topology_stages(settings)
    groups = {name: settings.group_id(name) for name in names}
    first = {name: _positions(settings, admin, consumer, name) for name in names}
    started = time.monotonic()
    time.sleep(interval_s)  # the second sample of the rates
    second = {name: _positions(settings, admin, consumer, name) for name in names}
    elapsed = time.monotonic() - started
    described = admin.describe_consumer_groups(list(groups.values()), request_timeout=TIMEOUT_S)
    stages = []
    for name, group in groups.items():
        try:
            description = described[group].result(timeout=TIMEOUT_S)
            state = description.state.name.lower()
            members = [
                Member(m.client_id, m.host, len(m.assignment.topic_partitions))
                for m in description.members
            ]
        except Exception as exc:
            stages.append(StageStatus(name, group, "unknown", [], None, error=str(exc)))
            continue
        (c1, o1, _), (c2, o2, lag) = first[name], second[name]
        stages.append(
            StageStatus(name, group, state, members, lag, (c2 - c1) / elapsed, (o2 - o1) / elapsed)
        )
    return stages


def _positions(
    settings: Settings, admin: AdminClient, consumer: Consumer, name: StageName
) -> tuple[int, int, int]:
    """(records the group committed, output topic end offsets, lag), each summed."""
    ends = {
        (topic, p): end
        for topic in input_topics(settings, name)
        for p, end in end_offsets(consumer, topic, timeout_s=TIMEOUT_S).items()
    }
    request = [ConsumerGroupTopicPartitions(settings.group_id(name))]
    answer = admin.list_consumer_group_offsets(request, request_timeout=TIMEOUT_S)
    committed: dict[tuple[str, int], int] = {}
    for future in answer.values():
        for tp in future.result(timeout=TIMEOUT_S).topic_partitions or []:
            if tp.offset >= 0:
                committed[(tp.topic, tp.partition)] = tp.offset
    lag = sum(max(0, end - committed.get(key, 0)) for key, end in ends.items())
    out = sum(end_offsets(consumer, output_topic(settings, name), timeout_s=TIMEOUT_S).values())
    return sum(committed.values()), out, lag


def _dead_letters(settings: Settings, consumer: Consumer) -> dict[tuple[str, str], int]:
    """Dead letters written in the last minute, by (stage, reason)."""
    topic = settings.topics.dlq
    since_ms = int((time.time() - DLQ_WINDOW_S) * 1000)
    starts = offsets_at(consumer, topic, since_ms, timeout_s=TIMEOUT_S)
    ends = end_offsets(consumer, topic, timeout_s=TIMEOUT_S)
    todo = {p: o for p, o in starts.items() if o < ends.get(p, 0)}
    counts: Counter[tuple[str, str]] = Counter()
    if not todo:
        return {}
    consumer.assign([TopicPartition(topic, p, o) for p, o in todo.items()])
    deadline, read = time.monotonic() + TIMEOUT_S, 0
    try:
        while todo and read < DLQ_READ_LIMIT and time.monotonic() < deadline:
            for message in consumer.consume(1000, timeout=0.2):
                if message.error():
                    continue
                read += 1
                if (message.offset() or 0) + 1 >= ends[message.partition() or 0]:
                    todo.pop(message.partition() or 0, None)
                if message.timestamp()[1] >= since_ms:
                    letter = read_dead_letter(message)
                    counts[(letter.stage or "?", letter.reason)] += 1
    finally:
        consumer.unassign()
    return dict(counts)


def _models(settings: Settings, consumer: Consumer) -> list[ModelRouting] | None:
    """Routing per model from the control topic; None when there is no control plane."""
    try:
        from stages.control import read_states
    except ImportError:
        return None
    try:
        states = read_states(consumer, settings.topics.models, timeout_s=TIMEOUT_S)
    except LookupError:  # the topic does not exist: no control plane here
        return None
    finally:
        consumer.unassign()
    return [
        ModelRouting(
            model=name,
            revision=state.revision,
            shares=_shares(state.routed()),
            loaded=list(state.loaded),
            shadow=state.shadow,
        )
        for name, state in sorted(states.items())
    ]


def _shares(weights: dict[str, int]) -> dict[str, float]:
    total = sum(weights.values())
    return {v: w / total for v, w in weights.items()} if total else {}


# -- rendering -------------------------------------------------------------------------------


def render(snapshot: Snapshot) -> RenderableType:
    """The screen for ``snapshot``."""
    taken = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(snapshot.taken_at))
    parts: list[RenderableType] = [Text(f"streaminfer status  {taken}", style="bold")]
    parts.append(_health_table(snapshot))
    parts.append(_stage_table(snapshot))
    parts.append(_dlq_table(snapshot))
    parts.append(_model_table(snapshot))
    parts.extend(Text(f"note: {note}", style="yellow") for note in snapshot.notes)
    return Group(*parts)


def _health_table(snapshot: Snapshot) -> Table:
    table = Table(title="Services and processes", title_justify="left", show_header=False)
    for health in snapshot.health:
        mark = Text("ok", style="green") if health.ok else Text("DOWN", style="bold red")
        table.add_row(health.name, mark, health.detail)
    for line in snapshot.processes:
        name, _, state = line.partition(": ")
        table.add_row(name, "", state)
    return table


def _stage_table(snapshot: Snapshot) -> Table:
    table = Table(title="Stages", title_justify="left")
    for column in ("stage", "group", "state", "members", "lag", "in/s", "out/s"):
        table.add_column(column, justify="right" if column in ("lag", "in/s", "out/s") else "left")
    for stage in snapshot.stages:
        members = "\n".join(f"{m.client_id}@{m.host} ({m.partitions}p)" for m in stage.members)
        table.add_row(
            stage.name,
            stage.group,
            stage.error or stage.state,
            members or "none",
            "?" if stage.lag is None else f"{stage.lag:,}",
            _rate(stage.in_rate),
            _rate(stage.out_rate),
        )
    if not snapshot.stages:
        table.add_row("(Kafka unreachable)", "", "", "", "", "", "")
    return table


def _rate(rate: float | None) -> str:
    return "?" if rate is None else f"{rate:,.1f}"


def _dlq_table(snapshot: Snapshot) -> Table:
    table = Table(title=f"Dead letters, last {DLQ_WINDOW_S:.0f} s", title_justify="left")
    table.add_column("stage")
    table.add_column("reason")
    table.add_column("records", justify="right")
    for (stage, reason), count in sorted(snapshot.dead_letters.items()):
        table.add_row(stage, reason, f"{count:,}")
    if not snapshot.dead_letters:
        table.add_row("none", "", "0")
    return table


def _model_table(snapshot: Snapshot) -> RenderableType:
    if snapshot.models is None:
        return Text("Models: no control topic (repository defaults)", style="dim")
    table = Table(title="Model routing", title_justify="left")
    for column in ("model", "rev", "shares", "loaded", "shadow"):
        table.add_column(column)
    for model in snapshot.models:
        shares = "  ".join(f"{v} {share:.0%}" for v, share in model.shares.items())
        table.add_row(
            model.model,
            str(model.revision),
            shares or "-",
            ", ".join(model.loaded),
            model.shadow or "-",
        )
    return table


# -- the command -----------------------------------------------------------------------------


def frames(settings: Settings, *, interval_s: float) -> Iterator[RenderableType]:
    """One rendered snapshot after another, forever (``--watch``)."""
    while True:
        yield render(collect(settings, interval_s=interval_s))


def show(settings: Settings, *, watch: bool = False, interval_s: float = 2.0) -> int:
    """Print the screen once, or keep refreshing it until Ctrl-C."""
    console = Console()
    if not watch:
        console.print(render(collect(settings, interval_s=min(interval_s, 1.0))))
        return 0
    screens = frames(settings, interval_s=interval_s)
    try:
        with Live(next(screens), console=console, auto_refresh=False, screen=False) as live:
            for screen in screens:
                live.update(screen, refresh=True)
    except KeyboardInterrupt:
        pass
    return 0

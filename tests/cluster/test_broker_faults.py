"""A three-broker cluster loses a broker under steady exactly-once load and loses nothing else.

Topics have replication factor 3 and ``min.insync.replicas`` 2, so with one node gone every
partition still has a leader and an in-sync follower, and acks=all writes and transactions go on.
Each test kills one node with SIGKILL mid-stream (no controlled shutdown), keeps the load going on
two nodes, restarts the node and checks that:

- nothing is lost and nothing doubled on ``inference.results`` as a read_committed reader sees
  it, and every result is in Redis;
- the restarted node rejoins: back in the ISR of every partition and leading some again.

It prints the pause the fault caused: end-to-end latency (``created_at`` -> stored) p50/p99/max
of the requests done before the kill, of those the fault caught (in flight at the kill or sent
while the node was down) and of those sent after its restart began, and the longest stretch
with no result stored. Timings are reported, never asserted.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, replace

import numpy as np
import pytest
import redis
from confluent_kafka import KafkaError, KafkaException
from confluent_kafka.admin import AdminClient

from kafkaio.offsets import group_backlog
from schemas import Codec, StoredV1
from schemas.keys import ResultKeys
from stages.committers import EXIT_STUCK
from streaminfer.kafka import make_admin, make_consumer
from streaminfer.settings import Settings
from streaminfer.wiring import STAGE_NAMES, input_topics
from tests.cluster.cluster import (
    ALL_RUNNING,
    INTERNAL_TOPICS,
    LocalCluster,
    leaders,
    off_preferred,
    topic_facts,
    under_replicated,
)
from tests.faults.harness import Ledger, ledger
from tests.fixtures import Load, StageProcesses, read_topic, wait_until

pytestmark = [pytest.mark.cluster, pytest.mark.timeout(420)]

# ~60 s of traffic: 12 s before the kill, ~18 s on two nodes, then the restart. Modest, since
# the cores are shared with three JVMs: the latencies should show the fault, not a backlog.
RATE = 100.0
COUNT = 6000
# Sent and stored before the measured load, so that its "before" window is steady state and
# not the first transactions' coordinator lookups and the model's first run.
WARMUP = 200
KILL_AT, RESTART_AT = 0.2, 0.5
STORED = Codec(StoredV1)
LEADERSHIP_MOVING = {KafkaError.NOT_LEADER_FOR_PARTITION, KafkaError.LEADER_NOT_AVAILABLE}


@pytest.fixture(autouse=True)
def healthy(cluster: LocalCluster, monkeypatch: pytest.MonkeyPatch) -> LocalCluster:
    """Every node up and every internal partition fully replicated before a test starts
    (a failed test may have left a node dead); stages exactly-once.

    The consumers keep the default 45 s session timeout on purpose. With 6 s (the stage fault
    tests' setting) a consumer whose group coordinator was on the killed node timed out its own
    session while the coordinator moved, rejoined under its static group.instance.id, and
    librdkafka then failed it fatally ("static consumer fenced by other consumer with same
    group.instance.id"). A restarted stage needs no short timeout: static membership gives it
    its partitions back at once."""
    if cluster.state() != ALL_RUNNING:
        cluster.start()
    admin = AdminClient({"bootstrap.servers": cluster.bootstrap})
    wait_until(lambda: not under_replicated(admin, INTERNAL_TOPICS), 120, "internal ISRs full")
    monkeypatch.setenv("STREAMINFER_PROCESSING_GUARANTEE", "exactly-once")
    return cluster


class Supervisor:
    """What compose or k8s would do for the stage processes: restart one that exits with
    EXIT_STUCK (its committer's watchdog caught librdkafka blocked in a transaction call after
    a coordinator moved); any other exit fails the test."""

    def __init__(self, stages: StageProcesses) -> None:
        self.stages = stages
        self.restarted: list[str] = []

    def check(self) -> None:
        for name in STAGE_NAMES:
            code = self.stages.procs[name].poll()
            if code == EXIT_STUCK:
                self.restarted.append(name)
                self.stages.start(name, wait=False)
            elif code is not None:
                log = (self.stages.log_dir / f"{name}.log").read_text()[-3000:]
                raise AssertionError(f"stage {name} exited with {code}:\n{log}")

    def wait(self, condition: Callable[[], bool], timeout_s: float, what: str) -> None:
        def supervised() -> bool:
            self.check()
            return condition()

        wait_until(supervised, timeout_s, what)


@dataclass(frozen=True)
class Fault:
    """What happened when: wall-clock times (``created_at`` is wall clock too)."""

    victim: int
    ids: list[str]
    started: float
    killed: float
    restarted: float
    rejoined: float = 0.0
    stages_restarted: tuple[str, ...] = ()


def test_kill_9_the_broker_leading_most_partitions(
    settings: Settings,
    stages: StageProcesses,
    redis_client: redis.Redis,
    healthy: LocalCluster,
    capsys: pytest.CaptureFixture[str],
) -> None:
    admin = make_admin(settings)

    def busiest() -> int:
        return leaders(admin, settings.topics.all()).most_common(1)[0][0]

    fault = _run_fault(settings, stages, redis_client, healthy, busiest)
    with capsys.disabled():
        print(_report("kill -9 the busiest partition leader", fault, settings))


def test_kill_9_the_active_controller(
    settings: Settings,
    stages: StageProcesses,
    redis_client: redis.Redis,
    healthy: LocalCluster,
    capsys: pytest.CaptureFixture[str],
) -> None:
    before = healthy.active_controller()
    fault = _run_fault(settings, stages, redis_client, healthy, healthy.active_controller)
    assert fault.victim == before
    after = healthy.active_controller()
    assert after != before, f"node {before} is the active controller again"
    with capsys.disabled():
        print(_report(f"kill -9 the active controller (node {before} -> {after})", fault, settings))


def _run_fault(
    settings: Settings,
    stages: StageProcesses,
    redis_client: redis.Redis,
    cluster: LocalCluster,
    pick_victim: Callable[[], int],
) -> Fault:
    """The whole scenario; returns its timeline after every assertion passed."""
    _assert_replicated(settings)
    stages.start_pipeline()
    supervisor = Supervisor(stages)
    warmup = Load(settings, count=WARMUP, rate=RATE, tag="warmup").start()
    warmup.join()
    _wait_stored(settings, redis_client, warmup.ids, supervisor)
    load = Load(settings, count=COUNT, rate=RATE).start()
    fault = _kill_and_restart(load, cluster, supervisor, pick_victim)
    supervisor.wait(lambda: load.sent == COUNT, 240, "the load sent everything")
    load.join()
    _wait_stored(settings, redis_client, load.ids, supervisor)
    # Before the ledger: the preferred-leader election that follows the rejoin would otherwise
    # move leaders under the reader's feet.
    _wait_rejoined(settings, fault.victim)
    fault = replace(fault, rejoined=time.time())
    result = _ledger(settings, redis_client, load.ids)
    assert result.lost == 0, f"{result.lost} of {result.sent} results lost"
    assert result.duplicates == 0, f"{result.duplicates} duplicate results"
    assert result.in_redis == result.sent, f"{result.sent - result.in_redis} missing in Redis"
    return replace(fault, stages_restarted=tuple(supervisor.restarted))


def _kill_and_restart(
    load: Load, cluster: LocalCluster, supervisor: Supervisor, pick_victim: Callable[[], int]
) -> Fault:
    """SIGKILL the victim at KILL_AT of the load, start it again at RESTART_AT."""
    started = time.time()
    supervisor.wait(lambda: load.sent >= COUNT * KILL_AT, 60, "load before the kill")
    victim = pick_victim()
    cluster.kill9(victim)
    killed = time.time()
    print(f"{killed - started:6.1f} s: killed node {victim}")
    supervisor.wait(lambda: load.sent >= COUNT * RESTART_AT, 120, "load on two nodes")
    restarted = time.time()
    _restart(cluster, supervisor)
    print(f"{time.time() - started:6.1f} s: node {victim} answers again")
    return Fault(victim, load.ids, started, killed, restarted)


def _assert_replicated(settings: Settings) -> None:
    admin = make_admin(settings)
    for topic in settings.topics.all():
        assert topic_facts(admin, topic) == (3, "2"), f"{topic}: (replication, min ISR)"


def _restart(cluster: LocalCluster, supervisor: Supervisor) -> None:
    """``start`` brings up only the missing node; the stages stay supervised meanwhile."""
    proc = cluster.start_async()
    supervisor.wait(lambda: proc.poll() is not None, 150, "the killed node restarted")
    out = proc.stdout.read() if proc.stdout else ""
    assert proc.returncode == 0, f"restart failed:\n{out}"


def _wait_stored(
    settings: Settings, client: redis.Redis, ids: list[str], supervisor: Supervisor
) -> None:
    keys = ResultKeys(settings.kafka.topic_prefix)
    names = [keys.key(settings.kafka.default_tenant, i) for i in ids]

    def stored() -> int:
        return sum(v is not None for v in client.mget(names))

    try:
        supervisor.wait(lambda: stored() == len(names), 180, "every result is in Redis")
    except AssertionError as exc:
        state = _pipeline_state(settings, supervisor.stages)
        raise AssertionError(f"{exc}: {stored()} of {len(names)} stored\n{state}") from exc


def _pipeline_state(settings: Settings, stages: StageProcesses) -> str:
    """Each stage's uncommitted backlog per input partition and the end of its log."""
    lines = []
    for name in STAGE_NAMES:
        consumer = make_consumer(settings, group_id=settings.group_id(name))
        try:  # reading committed offsets does not join the group
            backlog = {t: group_backlog(consumer, t) for t in input_topics(settings, name)}
        finally:
            consumer.close()
        log = (stages.log_dir / f"{name}.log").read_text(errors="replace")[-2500:]
        lines.append(f"----- {name}: backlog {backlog}\n{log}")
    return "\n".join(lines)


def _ledger(settings: Settings, client: redis.Redis, ids: list[str]) -> Ledger:
    """The harness's ledger, read again if a partition's leadership moves under the reader:
    for a moment after a leader election a broker or the reader's metadata still names the
    old leader, and librdkafka's watermark query does not retry NOT_LEADER itself."""
    found: list[Ledger] = []

    def read() -> bool:
        try:
            found.append(ledger(settings, client, ids, timeout_s=30))
        except KafkaException as exc:
            if exc.args[0].code() not in LEADERSHIP_MOVING:
                raise
            print(f"ledger read again after {exc}")
        return bool(found)

    wait_until(read, 120, "a ledger read with settled partition leaders")
    return found[0]


def _wait_rejoined(settings: Settings, victim: int) -> None:
    """Back in every ISR (pipeline and internal topics), and leading the partitions it is the
    preferred replica of again (the cluster checks leader balance every 30 s)."""
    admin = make_admin(settings)
    topics = [*settings.topics.all(), *INTERNAL_TOPICS]
    wait_until(lambda: not under_replicated(admin, topics), 120, f"node {victim} back in every ISR")
    wait_until(
        lambda: not off_preferred(admin, topics), 90, "every partition on its preferred leader"
    )
    assert leaders(admin, topics)[victim] > 0


def _report(title: str, fault: Fault, settings: Settings) -> str:
    stored = _stored_times(settings, fault.ids)
    # Every request in exactly one window: done before the kill; caught by the fault (in flight
    # at the kill or sent while the node was down); sent after the restart began.
    windows: dict[str, Callable[[float, float], bool]] = {
        "before": lambda _c, s: s < fault.killed,
        "fault": lambda c, s: s >= fault.killed and c < fault.restarted,
        "restart+": lambda c, _s: c >= fault.restarted,
    }
    lines = [f"\n== {title}: node {fault.victim}, down {fault.restarted - fault.killed:.1f} s"]
    for name, within in windows.items():
        lat = np.array([s - c for c, s in stored if within(c, s)])
        if lat.size:
            p50, p99 = np.percentile(lat, [50, 99])
            lines.append(
                f"   e2e {name:>8}: n={lat.size:5d} p50={p50 * 1000:7.0f} ms "
                f"p99={p99 * 1000:7.0f} ms max={lat.max() * 1000:7.0f} ms"
            )
    gap, at = _longest_stall([s for _, s in stored])
    lines.append(
        f"   longest stall with nothing stored: {gap:.2f} s, {at - fault.killed:+.1f} s "
        f"from the kill; rejoined {fault.rejoined - fault.restarted:.0f} s after restart"
    )
    restarted = ", ".join(fault.stages_restarted) or "none"
    lines.append(f"   stages restarted after EXIT_STUCK: {restarted}")
    return "\n".join(lines)


def _stored_times(settings: Settings, ids: list[str]) -> list[tuple[float, float]]:
    """(created_at, stored_at) of each of ``ids`` as inference.stored first has it."""
    wanted = set(ids)
    first: dict[str, tuple[float, float]] = {}
    everything = read_topic(settings, settings.topics.stored, count=WARMUP + COUNT, timeout_s=60)
    for message in everything:
        stored = STORED.decode(message.value() or b"")
        if stored.id in wanted:
            first.setdefault(stored.id, (stored.created_at, stored.stored_at))
    return list(first.values())


def _longest_stall(stored_at: list[float]) -> tuple[float, float]:
    """The longest gap between consecutive stores, and when it began."""
    times = np.sort(np.array(stored_at))
    gaps = np.diff(times)
    at = int(np.argmax(gaps))
    return float(gaps[at]), float(times[at])

"""One hop under a guarantee: where a transaction's time goes, and how late records arrive.

A feeder process produces records stamped with their send time, at a fixed rate, into a
fresh input topic; one stage worker (an identity transform, run in this process by this
checkout's real :class:`~stages.runtime.StageRunner` and committer, configured from the
settings) copies them to an output topic, adding the time it saw each; a ``read_committed``
collector process measures each record's age when it becomes visible (total: send -> visible
downstream; ``out``: stage -> visible, i.e. commit wait, commit and markers).

Timed: each transaction's commit as a whole (``txn_commit``), every producer call the
committer makes (begin, send_offsets, commit_transaction, flush) and the consumer's offset
commit (at-least-once). ``--debug-eos`` reads librdkafka's ``eos,protocol`` debug log: the
transactional requests sent (a retry is sent again) and the ``CONCURRENT_TRANSACTIONS``
answers (AddPartitionsToTxn: retried after a hard-coded 20 ms; AddOffsetsToTxn: after
``retry.backoff.ms``, doubling). ``--broker-pid`` adds the broker's CPU per record and per
transaction (only meaningful on a broker of your own: ``KAFKA_BOOTSTRAP_SERVERS``; a
variant's ``TXN_PROBE_BROKER_CONFIG=key=value;...`` sets dynamic broker configs first).
``--delivery-reports N`` instead measures the CPU per record of each delivery report mode.

    .venv/bin/python -m bench.txn_probe --rate 2000 --duration 10 --debug-eos
    .venv/bin/python -m bench.txn_probe --rounds 3 --variant drain: \
        --variant interval:STREAMINFER_STAGE_TXN_COMMIT_ON_DRAIN=false

Each ``--variant NAME:VAR=VALUE,...`` runs with those environment settings; ``--rounds``
interleaves the variants (A B A B ...) so that the box's load hits both alike, and the
summary gives the median and the range over the rounds.
"""

from __future__ import annotations

import argparse
import logging
import multiprocessing
import os
import statistics
import struct
import sys
import threading
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import psutil
from confluent_kafka import Consumer, Producer, TopicPartition
from confluent_kafka.admin._config import AlterConfigOpType, ConfigEntry, ConfigResource
from confluent_kafka.admin._resource import ResourceType
from confluent_kafka.cimpl import NewTopic

from stages.committers import AtLeastOnceCommitter, Committer, TransactionalCommitter
from stages.metrics import NullMetrics
from stages.records import BatchOutcome, HeaderList, Output, Record
from stages.runtime import StageRunner
from streaminfer.kafka import (
    consumer_config,
    make_admin,
    producer_config,
    transactional_producer_config,
)
from streaminfer.settings import Settings

# A variant's cluster-wide dynamic broker configs, ``key=value;...`` (see _set_broker_config).
BROKER_CONFIG_VARIABLE = "TXN_PROBE_BROKER_CONFIG"
STAMP = struct.Struct(">q")  # the feeder's send time, ns since the epoch


# --- timing ------------------------------------------------------------------------------


@dataclass
class Timings:
    """Durations (s) per step name, and librdkafka's EOS debug lines of interest."""

    steps: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))
    events: Counter[str] = field(default_factory=Counter)
    lock: threading.Lock = field(default_factory=threading.Lock)

    @contextmanager
    def step(self, name: str) -> Iterator[None]:
        started = time.perf_counter()
        try:
            yield
        finally:
            elapsed = time.perf_counter() - started
            with self.lock:
                self.steps[name].append(elapsed)


class TimedProducer(Producer):
    """A producer whose transactional calls and flushes are timed."""

    timings: Timings

    def begin_transaction(self, *args: Any) -> None:
        with self.timings.step("begin_transaction"):
            super().begin_transaction(*args)

    def send_offsets_to_transaction(self, *args: Any) -> None:
        with self.timings.step("send_offsets_to_transaction"):
            super().send_offsets_to_transaction(*args)

    def commit_transaction(self, *args: Any) -> None:
        with self.timings.step("commit_transaction"):
            super().commit_transaction(*args)
        self.poll(0)  # serve the debug log lines queued meanwhile

    def flush(self, *args: Any) -> int:
        with self.timings.step("flush"):
            return super().flush(*args)


class TimedConsumer(Consumer):
    """A consumer whose offset commits are timed."""

    timings: Timings

    def commit(self, *args: Any, **kwargs: Any) -> Any:
        with self.timings.step("consumer_commit"):
            return super().commit(*args, **kwargs)


class CommitMetrics(NullMetrics):
    """The committer's own figure: each transaction's commit, start to end."""

    def __init__(self, timings: Timings) -> None:
        self._timings = timings

    def transaction_committed(self, seconds: float) -> None:
        with self._timings.lock:
            self._timings.steps["txn_commit"].append(seconds)


class TimedCommitter:
    """Times ``publish`` (produce + whatever commit it triggers) and ``commit``."""

    def __init__(self, inner: Committer, timings: Timings) -> None:
        self._inner, self._timings = inner, timings

    def publish(
        self,
        outputs: Sequence[Output],
        offsets: Sequence[TopicPartition],
        *,
        drained: bool = False,
    ) -> None:
        with self._timings.step("publish"):
            self._inner.publish(outputs, offsets, drained=drained)

    def commit(self) -> None:
        with self._timings.step("commit"):
            self._inner.commit()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


class EosLog(logging.Handler):
    """Counts, from librdkafka's ``eos,protocol`` debug log, the transactional requests sent
    (a retry is sent again) and the ``CONCURRENT_TRANSACTIONS`` answers."""

    APIS = ("AddPartitionsToTxn", "AddOffsetsToTxn", "TxnOffsetCommit", "EndTxn")

    def __init__(self, timings: Timings) -> None:
        super().__init__()
        self._timings = timings

    def emit(self, record: logging.LogRecord) -> None:
        line = record.getMessage()
        events = self._timings.events
        if "Sent " in line:
            for api in self.APIS:
                if f"Sent {api}Request" in line:
                    events[f"sent[{api}]"] += 1
        elif "CONCURRENT_TRANSACTIONS" in line or "concurrent operation" in line:
            facility = "AddOffsetsToTxn" if "ADDOFFSETS" in line else "AddPartitionsToTxn"
            events[f"concurrent[{facility}]"] += 1


# --- the hop -----------------------------------------------------------------------------


class Identity:
    """The stage: every record copied to the output topic."""

    name = "probe"

    def __init__(self, topic: str) -> None:
        self._topic = topic

    def process(self, batch: Sequence[Record]) -> BatchOutcome:
        # The value gains the time the stage saw the record: in (feeder -> stage) and out
        # (stage -> visible downstream) are told apart.
        now = STAMP.pack(time.time_ns())
        outputs = [Output(self._topic, r.key, r.value + now, []) for r in batch]
        return BatchOutcome(outputs=outputs, rejected=[])


@dataclass(frozen=True)
class Result:
    """One run: record latencies (ms), step timings, debug counts, records sent."""

    latencies_ms: list[float]
    after_stage_ms: list[float]
    timings: Timings
    sent: int
    cpu_s: dict[str, float] = field(default_factory=dict)  # process -> CPU seconds of the run


def _committer(
    settings: Settings, consumer: Consumer, timings: Timings, debug_eos: bool
) -> Committer:
    if settings.stage.processing_guarantee == "at-least-once":
        producer = TimedProducer(producer_config(settings))
        producer.timings = timings
        return AtLeastOnceCommitter(
            producer=producer,
            consumer=consumer,
            delivery_timeout_s=settings.kafka.delivery_timeout_s,
            commit_async=settings.stage.commit_async,
        )
    config = transactional_producer_config(
        settings, transactional_id=f"txn-probe-{uuid.uuid4().hex[:8]}"
    )
    if debug_eos:
        logger = logging.getLogger("txn_probe.librdkafka")
        logger.propagate = False
        logger.setLevel(logging.DEBUG)
        logger.handlers = [EosLog(timings)]
        config = {**config, "debug": "eos,protocol", "logger": logger}

    def factory() -> Producer:
        producer = TimedProducer(config)
        producer.timings = timings
        return producer

    return TransactionalCommitter(
        producer_factory=factory,
        consumer=consumer,
        max_records=settings.stage.txn_max_records,
        max_interval_s=settings.stage.txn_max_interval_s,
        timeout_s=settings.kafka.delivery_timeout_s,
        commit_on_drain=settings.stage.txn_commit_on_drain,
        metrics=CommitMetrics(timings),
    )


def _feed(config: dict[str, Any], topic: str, rate: float, count: int) -> None:
    """Open loop: record i is due at t0 + i/rate; each is stamped when it is produced."""
    producer = Producer({**config, "linger.ms": 1})
    t0 = time.monotonic()
    sent = 0
    while sent < count:
        due = min(count, int((time.monotonic() - t0) * rate) + 1)
        for i in range(sent, due):
            producer.produce(topic, key=str(i).encode(), value=STAMP.pack(time.time_ns()))
        sent = due
        producer.poll(0)
        time.sleep(0.0005)
    producer.flush(30)


def _collect(config: dict[str, Any], topic: str, count: int, timeout_s: float, out: Any) -> None:
    """Puts on ``out`` per record: total latency (ms) and the part after the stage saw it."""
    consumer = Consumer(config)
    consumer.subscribe([topic])
    latencies: list[float] = []
    after_stage: list[float] = []
    deadline = time.monotonic() + timeout_s
    try:
        while len(latencies) < count and time.monotonic() < deadline:
            # consume(N, timeout) alone would wait for N records or the whole timeout.
            first = consumer.poll(0.1)
            if first is None:
                continue
            now = time.time_ns()
            for msg in [first, *consumer.consume(500, 0)]:
                if msg.error() is None:
                    value = msg.value() or b""
                    latencies.append((now - STAMP.unpack_from(value)[0]) / 1e6)
                    after_stage.append((now - STAMP.unpack_from(value, STAMP.size)[0]) / 1e6)
    finally:
        consumer.close()
        out.put((latencies, after_stage))


def run_hop(
    settings: Settings,
    *,
    rate: float,
    duration_s: float,
    debug_eos: bool = False,
    broker_pid: int | None = None,
) -> Result:
    """Feed ``rate``/s for ``duration_s`` through one stage; measure (with ``broker_pid``,
    the broker's CPU too: only meaningful on a broker nobody else uses). Topics are
    removed."""
    prefix = f"txnprobe-{uuid.uuid4().hex[:8]}."
    settings = settings.with_changes(kafka={"topic_prefix": prefix})
    source, sink = f"{prefix}in", f"{prefix}out"
    admin = make_admin(settings)
    _set_broker_config(admin, os.environ.get(BROKER_CONFIG_VARIABLE, ""))
    parts = settings.kafka.topic_partitions
    futures = admin.create_topics([NewTopic(t, parts, 1) for t in (source, sink, f"{prefix}dlq")])
    for future in futures.values():
        future.result(30)
    timings = Timings()
    consumer = TimedConsumer(consumer_config(settings, group_id=f"{prefix}probe"))
    consumer.timings = timings
    committer = TimedCommitter(_committer(settings, consumer, timings, debug_eos), timings)
    runner = StageRunner(
        stage=Identity(sink),
        consumer=consumer,
        committer=committer,
        input_topics=[source],
        dlq_topic=f"{prefix}dlq",
        batch_size=settings.stage.batch_max_records,
        batch_timeout_s=settings.stage.batch_timeout_s,
    )
    stop = threading.Event()
    count = int(rate * duration_s)
    worker = threading.Thread(target=runner.run, args=(stop,), daemon=True)
    worker.start()
    _wait_assigned(runner)
    # Feeder and collector in processes of their own: the stage's process is as in the
    # pipeline (in one process, their threads would compete with it for the GIL).
    spawn = multiprocessing.get_context("spawn")
    results = spawn.Queue()
    reader = consumer_config(settings, group_id=f"{prefix}collector")
    collector = spawn.Process(
        target=_collect, args=(reader, sink, count, duration_s + 30, results), daemon=True
    )
    collector.start()
    feeder = spawn.Process(
        target=_feed, args=(producer_config(settings), source, rate, count), daemon=True
    )
    processes = {"stage": psutil.Process()}
    if broker_pid is not None:
        processes["broker"] = psutil.Process(broker_pid)
    cpu_before = {name: _cpu_s(p) for name, p in processes.items()}
    feeder.start()
    try:
        latencies, after_stage = results.get(timeout=duration_s + 60)
        cpu = {name: _cpu_s(p) - cpu_before[name] for name, p in processes.items()}
    finally:
        stop.set()
        feeder.join(30)
        collector.join(30)
        worker.join(30)
        for future in admin.delete_topics([source, sink, f"{prefix}dlq"]).values():
            future.result(30)
    return Result(latencies, after_stage, timings, count, cpu)


def _cpu_s(process: psutil.Process) -> float:
    times = process.cpu_times()
    return float(times.user + times.system)


def _set_broker_config(admin: Any, assignments: str) -> None:
    """Sets dynamic broker configs, ``key=value;key=value``, on every broker (never on the
    shared broker: point ``KAFKA_BOOTSTRAP_SERVERS`` at one of your own)."""
    pairs = [a.split("=", 1) for a in assignments.split(";") if a]
    if not pairs:
        return
    entries = [
        ConfigEntry(k.strip(), v.strip(), incremental_operation=AlterConfigOpType.SET)
        for k, v in pairs
    ]
    brokers = admin.list_topics(timeout=30).brokers
    resources = [
        ConfigResource(ResourceType.BROKER, str(node), incremental_configs=entries)
        for node in brokers
    ]
    for future in admin.incremental_alter_configs(resources).values():
        future.result(30)
    time.sleep(1)  # the controller publishes it to the brokers


def _wait_assigned(runner: StageRunner, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not runner.assigned and time.monotonic() < deadline:
        time.sleep(0.05)
    if not runner.assigned:
        raise RuntimeError("the probe stage got no partitions")
    time.sleep(0.5)  # let the committer's producer find its coordinator


# --- delivery reports: CPU per record -----------------------------------------------------


DELIVERY_MODES = ("callback", "only-error", "none")


def delivery_cost(
    settings: Settings, *, records: int, batch: int = 500, order: Sequence[str] = DELIVERY_MODES
) -> dict[str, float]:
    """CPU (µs per record) of producing ``records`` outputs through a
    :class:`TransactionalCommitter`, one transaction per ``batch``, with each delivery report
    mode: a Python callback per record (``callback``), the callback only on errors
    (``only-error``: ``delivery.report.only.error``), or no callback (``none``). Thread CPU is
    the stage thread's (produce calls and the callbacks it serves); process CPU adds
    librdkafka's threads."""
    topic = f"txnprobe-{uuid.uuid4().hex[:8]}.out"
    admin = make_admin(settings)
    admin.create_topics([NewTopic(topic, settings.kafka.topic_partitions, 1)])[topic].result(30)
    group = Consumer(consumer_config(settings, group_id=f"txnprobe-{uuid.uuid4().hex[:8]}"))
    headers: HeaderList = [
        ("content-type", b"application/msgpack"),
        ("schema", b"ResultV1"),
        ("traceparent", b"x" * 55),
    ]
    outputs = [Output(topic, f"k{i}".encode(), b"v" * 200, headers) for i in range(batch)]
    row: dict[str, float] = {}
    try:
        for mode in order:
            config = transactional_producer_config(
                settings, transactional_id=f"txn-probe-{uuid.uuid4().hex[:8]}"
            )
            config["delivery.report.only.error"] = mode == "only-error"
            committer = TransactionalCommitter(
                producer_factory=lambda config=config: Producer(config),  # type: ignore[misc]
                consumer=group,
                max_records=batch,
                max_interval_s=60.0,
                timeout_s=settings.kafka.delivery_timeout_s,
            )
            if mode == "none":
                committer._on_delivery = None  # type: ignore[assignment]
            thread0, process0 = time.thread_time_ns(), time.process_time_ns()
            for _ in range(records // batch):
                committer.publish(outputs, [])  # max_records = batch: commits each time
            row[f"{mode}.thread_us"] = (time.thread_time_ns() - thread0) / records / 1e3
            row[f"{mode}.process_us"] = (time.process_time_ns() - process0) / records / 1e3
    finally:
        group.close()
        admin.delete_topics([topic])[topic].result(30)
    return row


# --- report ------------------------------------------------------------------------------


def pct(values: Sequence[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def summary(result: Result) -> dict[str, float]:
    """Flat figures of one run (ms unless named otherwise)."""
    lat = result.latencies_ms
    row: dict[str, float] = {
        "received": len(lat),
        "records": result.sent,
        "p50": pct(lat, 0.5),
        "p99": pct(lat, 0.99),
        "max": max(lat, default=float("nan")),
        "out.p50": pct(result.after_stage_ms, 0.5),
        "out.p99": pct(result.after_stage_ms, 0.99),
    }
    for name, values in sorted(result.timings.steps.items()):
        ms = [v * 1000 for v in values]
        row[f"{name}.n"] = len(ms)
        row[f"{name}.p50"] = pct(ms, 0.5)
        row[f"{name}.p99"] = pct(ms, 0.99)
        row[f"{name}.max"] = max(ms)
    for event, n in sorted(result.timings.events.items()):
        row[event] = n
    txns = len(result.timings.steps.get("txn_commit", [])) or float("nan")
    for name, seconds in result.cpu_s.items():
        row[f"cpu.{name}_us_per_record"] = seconds * 1e6 / result.sent
        row[f"cpu.{name}_us_per_txn"] = seconds * 1e6 / txns
    return row


def _variant(text: str) -> tuple[str, dict[str, str]]:
    name, _, assignments = text.partition(":")
    pairs = [a.split("=", 1) for a in assignments.split(",") if a]
    return name, {k.strip(): v.strip() for k, v in pairs}


@contextmanager
def _environment(env: dict[str, str]) -> Iterator[None]:
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.txn_probe", description=__doc__)
    parser.add_argument("--rate", type=float, default=2000.0, help="records/s (open loop)")
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per run")
    parser.add_argument("--rounds", type=int, default=1, help="interleaved runs per variant")
    parser.add_argument("--variant", action="append", default=[], metavar="NAME:VAR=VALUE,...")
    parser.add_argument("--debug-eos", action="store_true", help="count CONCURRENT_TRANSACTIONS")
    parser.add_argument("--steps", action="store_true", help="print every step's timings")
    parser.add_argument("--broker-pid", type=int, help="also the CPU of this (private) broker")
    parser.add_argument(
        "--delivery-reports",
        type=int,
        metavar="N",
        help="instead: CPU per record of N records per delivery report mode, --rounds times",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(message)s")
    if args.delivery_reports:
        return _delivery_reports(Settings(), args.delivery_reports, args.rounds)
    variants = [_variant(v) for v in args.variant] or [("base", {})]
    rows: dict[str, list[dict[str, float]]] = defaultdict(list)
    for round_ in range(args.rounds):
        for name, env in variants:
            load = os.getloadavg()[0]
            with _environment(env):
                result = run_hop(
                    Settings(),
                    rate=args.rate,
                    duration_s=args.duration,
                    debug_eos=args.debug_eos,
                    broker_pid=args.broker_pid,
                )
            row = summary(result)
            rows[name].append(row)
            print(_line(f"r{round_ + 1} {name}", row, load, steps=args.steps), flush=True)
    if args.rounds > 1:
        for name, runs in rows.items():
            print(_median_line(name, runs))
    return 0


def _delivery_reports(settings: Settings, records: int, rounds: int) -> int:
    runs = []
    for round_ in range(rounds):
        load = os.getloadavg()[0]
        shift = round_ % len(DELIVERY_MODES)  # each mode runs first, second, ... in turn
        order = DELIVERY_MODES[shift:] + DELIVERY_MODES[:shift]
        row = dict(sorted(delivery_cost(settings, records=records, order=order).items()))
        runs.append(row)
        cells = "  ".join(f"{k} {v:5.2f}" for k, v in row.items())
        print(f"r{round_ + 1} load {load:4.1f}  µs/record: {cells}", flush=True)
    for key in runs[0]:
        values = [r[key] for r in runs]
        spread = f"[{min(values):.2f}-{max(values):.2f}]"
        print(f"median {key:22} {statistics.median(values):5.2f} {spread}")
    return 0


KEYS = ("p50", "p99", "max", "out.p50", "out.p99")
STEP_KEYS = ("txn_commit", "commit_transaction", "send_offsets_to_transaction", "flush")


def _line(label: str, row: dict[str, float], load: float, *, steps: bool) -> str:
    head = (
        f"{label:14} load {load:4.1f}  got {row['received']:.0f}/{row['records']:.0f}  "
        + "  ".join(f"{k} {row[k]:6.1f}" for k in KEYS)
    )
    parts = [head]
    for step in STEP_KEYS:
        if f"{step}.n" in row:
            parts.append(
                f"   {step:28} n {row[step + '.n']:5.0f}  p50 {row[step + '.p50']:6.2f}  "
                f"p99 {row[step + '.p99']:6.2f}  max {row[step + '.max']:7.2f}"
            )
    if steps:
        names = sorted({k.rsplit(".", 1)[0] for k in row if k.endswith(".n")} - set(STEP_KEYS))
        for step in names:
            parts.append(
                f"   {step:28} n {row[step + '.n']:5.0f}  p50 {row[step + '.p50']:6.2f}  "
                f"p99 {row[step + '.p99']:6.2f}  max {row[step + '.max']:7.2f}"
            )
    events = {k: v for k, v in row.items() if k.startswith(("concurrent", "sent", "cpu"))}
    if events:
        parts.append("   " + "  ".join(f"{k} {v:.0f}" for k, v in events.items()))
    return "\n".join(parts)


def _median_line(name: str, runs: list[dict[str, float]]) -> str:
    cells = []
    cpu_keys = sorted({k for run in runs for k in run if k.startswith("cpu.")})
    txn_keys = ("txn_commit.n", "txn_commit.p50", "txn_commit.p99", "txn_commit.max")
    for key in (*KEYS, *txn_keys, *cpu_keys):
        values = [r[key] for r in runs if key in r]
        if values:
            cells.append(
                f"{key} {statistics.median(values):6.1f} [{min(values):.1f}-{max(values):.1f}]"
            )
    return f"median {name:10} " + "  ".join(cells)


if __name__ == "__main__":
    sys.exit(main())

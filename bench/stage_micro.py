"""Per-record CPU of the stage runtime and the three stages: ``python -m bench.stage_micro``.

Drives each stage's real :class:`~stages.runtime.StageRunner` in this process over
pre-built ``confluent_kafka.Message`` s (digits requests, with the headers ingest writes),
with a stand-in consumer and a committer that keeps the outputs (no broker, no Redis: persist
gets a store that only buffers). validate's outputs become infer's input messages, infer's
persist's, all built before the clock starts. Reported per stage: CPU µs per record
(``process_time``, so other processes on the box do not count), of which ``session.run``
for infer, and the garbage collector's pauses (count, total, max) measured with
``gc.callbacks``.

Before/after: ``--variant base=/work/base --variant new=/work/main`` runs each tree in a
child process (its directory first on ``sys.path``), interleaved ``--rounds`` times, and
prints the median and spread of each figure per variant. The code measured is whatever the
tree holds; this file only uses interfaces that exist in both.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import msgspec

# Imported lazily (inside the child) so that ``--variant`` measures the tree it names.
HERE = Path(__file__).resolve()
STAGES = ("validate", "infer", "persist")
# A consumed record: topic, partition, offset, key, value, headers, timestamp (ms).
Raw = tuple[str, int, int, bytes | None, bytes, tuple[tuple[str, bytes], ...], int]


class FakeConsumer:
    """Serves ``records`` in order, as ``confluent_kafka.Message`` s made on demand (a
    consumer makes them in ``consume`` too; held as tuples, the input is not a heap the
    garbage collector scans): ``poll`` one, ``consume`` up to N; nothing else."""

    def __init__(self, records: Sequence[Raw], drained: threading.Event | None = None) -> None:
        from confluent_kafka import Message

        self._message = Message
        self._records = records
        self._next = 0
        self._drained = drained or threading.Event()  # set once the last record is served
        self.own_ns = 0  # CPU spent making Messages: reported apart from the stage's
        self.first_ns: int | None = None  # process CPU clock at the first consume
        self.on_first: list[Any] = []  # gc callbacks to register then

    @property
    def left(self) -> int:
        return len(self._records) - self._next

    def poll(self, timeout: float | None = None) -> Any:
        taken = self.consume(1)
        return taken[0] if taken else None

    def consume(self, num_messages: int = 1, timeout: float | None = None) -> list[Any]:
        if self.first_ns is None:  # the loop starts: what run() did before is start-up
            self.first_ns = time.process_time_ns()
            gc.callbacks.extend(self.on_first)
        started = time.thread_time_ns()
        taken = self._records[self._next : self._next + num_messages]
        self._next += len(taken)
        if self._next >= len(self._records):
            self._drained.set()
        messages = [
            self._message(
                topic=topic,
                partition=partition,
                offset=offset,
                key=key,
                value=value,
                headers=list(headers),
                timestamp=(1, timestamp),
            )
            for topic, partition, offset, key, value, headers, timestamp in taken
        ]
        self.own_ns += time.thread_time_ns() - started
        return messages

    def subscribe(self, *args: Any, **kwargs: Any) -> None: ...
    def close(self) -> None: ...
    def pause(self, partitions: Any) -> None: ...
    def resume(self, partitions: Any) -> None: ...


class KeepingCommitter:
    """Keeps what is published; with ``producer``, also produces each output (and purges
    the producer's queue after each batch), to count the produce call's CPU too."""

    def __init__(self, producer: Any = None) -> None:
        self.outputs: list[bytes] = []
        self._producer = producer
        self.own_ns = 0  # CPU spent keeping outputs: not the stage's

    def publish(self, outputs: Sequence[Any], offsets: Sequence[Any], **kwargs: Any) -> None:
        if self._producer is not None:
            from stages.committers import produce

            for output in outputs:
                produce(self._producer, output, None)
            self._producer.purge()
        started = time.thread_time_ns()
        # Kept as MessagePack bytes, which the collector does not track: in a worker the
        # outputs die once produced, and a growing heap of them would slow every collection.
        encode = msgspec.msgpack.encode
        self.outputs.extend(
            encode((o.key, o.value, [(k, _bytes(v)) for k, v in o.headers])) for o in outputs
        )
        self.own_ns += time.thread_time_ns() - started

    def commit(self) -> None: ...
    def commit_due_in(self) -> float | None:
        return None

    def abort(self) -> None: ...
    def close(self) -> None: ...


class BufferingStore:
    """What persist needs of a ResultStore, without Redis: ``add`` buffers, ``flush``
    forgets. Attributes a newer store may have are answered by a no-op."""

    def __init__(self) -> None:
        from schemas.keys import ResultKeys

        self.keys = ResultKeys()
        self._pending: list[tuple[str, str, bytes]] = []

    def add(self, tenant: str, request_id: str, value: bytes) -> None:
        self._pending.append((tenant, request_id, value))

    def flush(self) -> int:
        written = len(self._pending)
        self._pending.clear()
        return written

    def discard(self) -> None:
        self._pending.clear()

    def __getattr__(self, name: str) -> Callable[..., None]:
        return lambda *args, **kwargs: None


class EchoStage:
    """The least a stage does: one output per record, its value as it came, with the
    headers every stage output gets. Run under the runner, it measures the runtime's part
    of every stage's per-record CPU (consuming, isolating, size checks, offsets, metrics)."""

    name = "echo"

    def process(self, batch: Sequence[Any]) -> Any:
        from stages.records import BatchOutcome, Output, output_headers

        return BatchOutcome(
            outputs=[
                Output(topic="echo", key=r.key, value=r.value, headers=output_headers(r, "x/1"))
                for r in batch
            ],
            rejected=[],
        )


def stage_metrics(stage: str) -> Any:
    """The stage's Prometheus metrics (as a worker has them, without the HTTP server), which
    also sum the infer stage's ``session.run`` seconds in ``compute_s``."""
    from prometheus_client import CollectorRegistry

    from stages.metrics import PrometheusStageMetrics

    class Timed(PrometheusStageMetrics):
        compute_s = 0.0

        def model_run(self, *, compute_s: float, **kwargs: Any) -> None:
            self.compute_s += compute_s
            super().model_run(compute_s=compute_s, **kwargs)

    return Timed(stage=stage, registry=CollectorRegistry())


class GcPauses:
    """Every collection's CPU time (``thread_time``) and wall time while registered in
    ``gc.callbacks``."""

    def __init__(self) -> None:
        self.pauses: list[tuple[int, float, float]] = []
        self._started = (0.0, 0.0)
        self.collected = 0  # objects freed by the collector (reference cycles)

    def __call__(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self._started = (time.thread_time(), time.perf_counter())
        else:
            cpu, wall = self._started
            cpu, wall = time.thread_time() - cpu, time.perf_counter() - wall
            self.pauses.append((info["generation"], cpu, wall))
            self.collected += info["collected"]

    def summary(self) -> dict[str, float]:
        return {
            "gc_count": len(self.pauses),
            "gc_gen2": sum(1 for g, _, _ in self.pauses if g == 2),
            "gc_cpu_ms": 1e3 * sum(c for _, c, _ in self.pauses),
            "gc_max_cpu_ms": 1e3 * max((c for _, c, _ in self.pauses), default=0.0),
            "gc_max_wall_ms": 1e3 * max((w for _, _, w in self.pauses), default=0.0),
            "gc_collected": self.collected,
        }


def request_records(count: int, *, tenant: bool) -> list[Raw]:
    """``count`` digits requests as ingest writes them to ``inference.requests``."""
    import numpy as np

    from kafkaio.produce import request_headers
    from schemas import Codec, RequestV1, tensor_from_array
    from streaminfer.settings import REPO_ROOT

    features = np.load(REPO_ROOT / "models" / "digits" / "holdout.npz")["X"].astype(np.float32)
    inputs = [{"input": tensor_from_array(x)} for x in features]
    codec = Codec(RequestV1)
    now = time.time()
    records: list[Raw] = []
    for i in range(count):
        request = RequestV1(
            id=f"bench-{i}", model="digits", inputs=inputs[i % len(inputs)], created_at=now
        )
        headers = request_headers(tenant=b"acme" if tenant else None)
        value = codec.encode(request)
        pairs = tuple((k, _bytes(v)) for k, v in headers)
        records.append(
            ("inference.requests", i % 6, i // 6, request.id.encode(), value, pairs, int(now * 1e3))
        )
    return records


def as_records(outputs: Sequence[bytes], topic: str) -> list[Raw]:
    """The records the next stage consumes from ``outputs`` (as :class:`KeepingCommitter`
    keeps them)."""
    now_ms = int(time.time() * 1000)
    records: list[Raw] = []
    for i, kept in enumerate(outputs):
        key, value, headers = msgspec.msgpack.decode(kept)
        pairs = tuple((k, v) for k, v in headers)
        records.append((topic, i % 6, i // 6, key, value, pairs, now_ms))
    return records


def _bytes(value: str | bytes | None) -> bytes:
    if value is None:
        return b""
    return value.encode() if isinstance(value, str) else value


def build_stages(models: Path) -> dict[str, tuple[Any, Any]]:
    """Each stage as a worker builds it (``streaminfer.wiring``), with its metrics."""
    from schemas.models import ModelCatalog
    from stages.fleet import ModelFleet
    from stages.infer import InferStage
    from stages.models import ModelRegistry
    from stages.persist import PersistStage
    from stages.plugins import StageProcessors
    from stages.validate import ValidateStage

    metrics = {name: stage_metrics(name) for name in STAGES}
    return {
        "validate": (
            ValidateStage(
                catalog=ModelCatalog(models),
                output_topic="inference.validated",
                processors=StageProcessors("validate", metrics=metrics["validate"]),
            ),
            metrics["validate"],
        ),
        "infer": (
            InferStage(
                fleet=ModelFleet(registry=ModelRegistry(root=models)),
                output_topic="inference.results",
                shadow_topic="inference.shadow",
                metrics=metrics["infer"],
            ),
            metrics["infer"],
        ),
        "persist": (
            PersistStage(
                store=BufferingStore(),  # type: ignore[arg-type]
                output_topic="inference.stored",
                metrics=metrics["persist"],
            ),
            metrics["persist"],
        ),
    }


def run_stage(
    stage: Any,
    records: list[Raw],
    *,
    batch: int,
    producer: Any,
    before: Callable[[], object],
    metrics: Any = None,
    heap: str = "default",
) -> tuple[dict[str, float], list[Any]]:
    """Run ``stage`` under a StageRunner over ``messages``; CPU and GC figures, outputs."""
    from stages.runtime import StageRunner

    drained = threading.Event()
    consumer = FakeConsumer(records, drained)
    committer = KeepingCommitter(producer)
    runner = StageRunner(
        stage=stage,
        consumer=consumer,  # type: ignore[arg-type]
        committer=committer,
        input_topics=["in"],
        dlq_topic="dlq",
        batch_size=batch,
        batch_timeout_s=0.0,
        metrics=metrics,
        **heap_argument(heap),
    )
    pauses = GcPauses()
    consumer.on_first.append(pauses)
    before()
    try:
        runner.run(drained)  # as a worker runs it, measured from its first consume
    finally:
        elapsed_ns = time.process_time_ns() - (consumer.first_ns or 0)
        if pauses in gc.callbacks:
            gc.callbacks.remove(pauses)
    # The stand-ins' own CPU (making Messages, keeping outputs) is not the stage's.
    stage_ns = elapsed_ns - consumer.own_ns - committer.own_ns
    return {"cpu_us": stage_ns / 1e3 / len(records), **pauses.summary()}, committer.outputs


def heap_argument(heap: str) -> dict[str, Any]:
    """StageRunner's ``heap`` argument for ``--heap`` (none where the runner has none):
    ``default``, ``none``, or ``freeze=0|1,per_record=N,min=N`` (HeapPolicy's fields)."""
    import inspect

    from stages.runtime import StageRunner

    if "heap" not in inspect.signature(StageRunner).parameters or heap == "default":
        return {}
    if heap == "none":
        return {"heap": None}
    from stages.runtime import HeapPolicy

    fields = dict(item.split("=") for item in heap.split(","))
    policy = HeapPolicy(
        freeze=fields.get("freeze", "1") == "1",
        gen0_per_record=int(fields.get("per_record", "40")),
        gen0_min=int(fields.get("min", "50000")),
    )
    return {"heap": policy}


def consume_only(records: list[Raw], batch: int) -> dict[str, float]:
    """CPU per record of the stand-in consumer alone (making the Messages): part of every
    stage's figure, as consuming is in a worker."""
    consumer = FakeConsumer(records)
    started = time.process_time_ns()
    while consumer.left:
        consumer.consume(batch)
    return {"cpu_us": (time.process_time_ns() - started) / 1e3 / len(records)}


def _nothing() -> None:
    pass


def measure(args: argparse.Namespace) -> dict[str, dict[str, float]]:
    """One measurement of every stage over ``args.records`` messages (after a warm-up)."""
    import streaminfer.wiring  # noqa: F401  (a worker's modules: the heap the collector scans)
    from streaminfer.settings import REPO_ROOT

    producer = None
    if args.produce:
        from confluent_kafka import Producer

        # Nothing listens there: produce only queues (and purge drops), no network I/O.
        producer = Producer({"bootstrap.servers": "127.0.0.1:1", "log_level": 0})
    stages = build_stages(REPO_ROOT / "models")
    warm = request_records(args.batch * 2, tenant=args.tenant)
    inputs = request_records(args.records, tenant=args.tenant)
    gc.collect()
    if args.gc_freeze:  # what a worker may do once started: the heap so far is never scanned
        gc.freeze()
    figures: dict[str, dict[str, float]] = {"consume": consume_only(inputs, args.batch)}
    topics = {"validate": "inference.validated", "infer": "inference.results"}
    echo_metrics = stage_metrics("echo")
    common = {"batch": args.batch, "producer": producer, "metrics": echo_metrics, "heap": args.heap}
    run_stage(EchoStage(), warm, before=_nothing, **common)
    figures["runtime"], _ = run_stage(EchoStage(), inputs, before=gc.collect, **common)
    for name in STAGES:
        stage, metrics = stages[name]
        common = {"batch": args.batch, "producer": producer, "metrics": metrics, "heap": args.heap}
        _, warm_out = run_stage(stage, warm, before=_nothing, **common)
        metrics.compute_s = 0.0
        figures[name], outputs = run_stage(stage, inputs, before=gc.collect, **common)
        if len(outputs) != len(inputs):
            raise RuntimeError(f"{name}: {len(outputs)} outputs for {len(inputs)} records")
        if name == "infer":
            figures[name]["session_run_us"] = 1e6 * metrics.compute_s / len(inputs)
        if name in topics:
            warm = as_records(warm_out, topics[name])
            inputs = as_records(outputs, topics[name])
            del outputs, warm_out
    figures["all"] = {
        "cpu_us": sum(figures[s]["cpu_us"] for s in STAGES),
        "gc_max_cpu_ms": max(figures[s]["gc_max_cpu_ms"] for s in STAGES),
        "gc_cpu_ms": sum(figures[s]["gc_cpu_ms"] for s in STAGES),
    }
    return figures


def print_table(rows: dict[str, dict[str, dict[str, list[float]]]]) -> None:
    """Per variant and stage: median [min-max] of each figure."""
    keys = (
        "cpu_us",
        "session_run_us",
        "gc_count",
        "gc_gen2",
        "gc_cpu_ms",
        "gc_max_cpu_ms",
        "gc_max_wall_ms",
        "gc_collected",
    )
    print(f"{'variant':10} {'stage':9} " + " ".join(f"{k:>20}" for k in keys))
    for variant, stages in rows.items():
        for stage, figures in stages.items():
            cells = []
            for key in keys:
                values = figures.get(key)
                if not values:
                    cells.append(f"{'-':>20}")
                    continue
                med = statistics.median(values)
                cells.append(f"{med:7.2f} [{min(values):.1f}-{max(values):.1f}]".rjust(20))
            print(f"{variant:10} {stage:9} " + " ".join(cells))


def child_command(tree: Path, args: argparse.Namespace, heap: str) -> list[str]:
    """This file run with ``tree`` first on ``sys.path`` (``-c``: the cwd comes first)."""
    runner = (
        "import runpy, sys; sys.argv = sys.argv[1:]; "
        "runpy.run_path(sys.argv[0], run_name='__main__')"
    )
    flags = [
        "--records",
        str(args.records),
        "--batch",
        str(args.batch),
        *(["--produce"] if args.produce else []),
        *(["--tenant"] if args.tenant else []),
        *(["--gc-freeze"] if args.gc_freeze else []),
        "--heap",
        heap,
        "--json",
    ]
    return [sys.executable, "-c", runner, str(HERE), *flags]


def compare(args: argparse.Namespace) -> None:
    # name=tree, or name=tree@heap (the runner's --heap in that run)
    variants = dict(v.split("=", 1) for v in args.variant)
    rows: dict[str, dict[str, dict[str, list[float]]]] = {v: {} for v in variants}
    for round_ in range(args.rounds):
        for variant, where in variants.items():
            tree, _, heap = where.partition("@")
            env = {**os.environ, "PYTHONPATH": tree}
            done = subprocess.run(
                child_command(Path(tree), args, heap or args.heap),
                cwd=tree,
                env=env,
                capture_output=True,
                text=True,
                check=True,
            )
            result = json.loads(done.stdout.strip().splitlines()[-1])
            for stage, figures in result.items():
                for key, value in figures.items():
                    rows[variant].setdefault(stage, {}).setdefault(key, []).append(value)
            print(
                f"round {round_ + 1} {variant}: "
                + ", ".join(f"{s} {result[s]['cpu_us']:.1f}" for s in (*STAGES, "all")),
                file=sys.stderr,
                flush=True,
            )
    print(f"load average: {os.getloadavg()}")
    print_table(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=50_000)
    parser.add_argument("--batch", type=int, default=500, help="batch_max_records")
    parser.add_argument("--rounds", type=int, default=5, help="with --variant: interleaved runs")
    parser.add_argument(
        "--variant", action="append", default=[], help="name=tree (repeat): compare trees"
    )
    parser.add_argument("--produce", action="store_true", help="also produce each output")
    parser.add_argument("--tenant", action="store_true", help="requests carry a tenant header")
    parser.add_argument(
        "--gc-freeze", action="store_true", help="gc.freeze() after start-up (as a worker may)"
    )
    parser.add_argument(
        "--heap",
        default="default",
        help="the runner's HeapPolicy: default, none, freeze=1,per_record=N,min=N",
    )
    parser.add_argument("--json", action="store_true", help="one JSON line (for --variant)")
    args = parser.parse_args()
    if args.variant:
        compare(args)
        return
    threading.current_thread().name = "stage-micro"
    figures = measure(args)
    if args.json:
        print(json.dumps(figures))
        return
    print(f"load average: {os.getloadavg()}")
    print_table({"this": {s: {k: [v] for k, v in f.items()} for s, f in figures.items()}})


if __name__ == "__main__":
    main()

"""What persist costs per result: ``python -m bench.redis_micro``.

CPU µs per result of the persist stage (``PersistStage.process`` on batches of digits-like
``ResultV1`` records, Prometheus metrics on, as in production) and of Redis, for several
checkouts interleaved in one run (``--variant name=<repo root>``, e.g. a ``git worktree`` of
the commit before a change; default: this checkout only). Each measurement is a fresh worker
process that imports the variant's ``stages``/``sinks``/``schemas`` (``python -P`` with
``PYTHONPATH=<root>``), so the variants never share code; the order alternates every round.

Redis is a private ``redis-server`` started here on a free loopback port (no persistence),
so its CPU (``INFO cpu``, getrusage: µs resolution) is only ours; ``--redis-url`` uses an
existing one instead (then other clients' work is counted too).

``--mode store`` times only the Redis writes (``ResultStore.add``/``flush``);
``--subscriber`` adds a process that pattern-subscribes to every channel of the run (as the
benchmark's outside-in latency subscriber does) and reports its CPU too;
``--no-hiredis`` makes redis-py use its pure-Python parser and packer.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve()
REPO = HERE.parent.parent


# --- the worker (runs under the variant's PYTHONPATH; imports the variant's code) -------------


def _worker(args: argparse.Namespace) -> dict[str, Any]:
    import numpy as np
    import psutil
    import redis
    from prometheus_client import CollectorRegistry

    from schemas import Codec, Headers, ResultV1, tensor_from_array
    from schemas.keys import ResultKeys
    from sinks.redis_store import ResultStore
    from stages.metrics import PrometheusStageMetrics
    from stages.persist import PersistStage
    from stages.records import Record

    client = _client(redis, args.redis_url, hiredis=not args.no_hiredis)
    prefix = f"micro-{uuid.uuid4().hex[:6]}."
    store = ResultStore(client=client, ttl_s=600, keys=ResultKeys(prefix=prefix))
    metrics = PrometheusStageMetrics(stage="persist", registry=CollectorRegistry())
    stage = PersistStage(store=store, output_topic="inference.stored", metrics=metrics)

    rng = np.random.default_rng(7)
    codec = Codec(ResultV1)
    now = time.time()
    records = []
    for i in range(args.results + args.batch):
        probabilities = rng.random(10, dtype=np.float32)
        result = ResultV1(
            id=f"run-{i:07d}",
            model="digits",
            model_version="1",
            status="ok",
            outputs={
                "label": tensor_from_array(np.array(int(probabilities.argmax()))),
                "probabilities": tensor_from_array(probabilities),
            },
            created_at=now,
            label=str(int(probabilities.argmax())),
            scores={str(d): float(p) for d, p in enumerate(probabilities)},
            timings={"validated": now, "inferred": now},
        )
        headers = (
            (Headers.CONTENT_TYPE, Headers.MSGPACK),
            (Headers.SCHEMA, b"inference.result/1"),
            (Headers.TRACEPARENT, b"00-" + os.urandom(16).hex().encode() + b"-0000000000000001-01"),
            (Headers.TENANT, f"tenant{i % args.tenants}".encode()),
        )
        value = codec.encode(result)
        records.append(Record("inference.results", 0, i, result.id.encode(), value, headers))
    writes = [(f"tenant{i % args.tenants}", f"run-{i:07d}", r.value) for i, r in enumerate(records)]

    def run(start: int, count: int) -> None:
        for s in range(start, start + count, args.batch):
            if args.mode == "persist":
                stage.process(records[s : s + args.batch])
            else:
                for tenant, request_id, value in writes[s : s + args.batch]:
                    store.add(tenant, request_id, value)
                store.flush()

    with _subscriber(args, prefix) as listener:
        run(0, args.batch)  # warm-up: connection, code paths
        redis_before = _redis_cpu_s(client)
        listener_before = _cpu_s(psutil, listener)
        cpu_before, wall_before = time.process_time(), time.perf_counter()
        run(args.batch, args.results)
        cpu_s, wall_s = time.process_time() - cpu_before, time.perf_counter() - wall_before
        redis_s = _redis_cpu_s(client) - redis_before
        time.sleep(0.2)  # let the subscriber drain what it was sent
        listener_s = _cpu_s(psutil, listener) - listener_before
    per = 1e6 / args.results
    return {
        "persist_us": cpu_s * per,
        "redis_us": redis_s * per,
        "subscriber_us": listener_s * per if listener is not None else None,
        "wall_us": wall_s * per,
    }


def _client(redis: Any, url: str, *, hiredis: bool) -> Any:
    if hiredis:
        return redis.Redis.from_url(url, socket_timeout=5, socket_connect_timeout=5)
    import redis.connection as rc

    rc.HIREDIS_AVAILABLE = False  # read when a connection builds its command packer
    pool = redis.ConnectionPool.from_url(url, parser_class=rc._RESP2Parser, socket_timeout=5)
    return redis.Redis(connection_pool=pool)


def _redis_cpu_s(client: Any) -> float:
    info = client.info("cpu")
    return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])


def _cpu_s(psutil: Any, process: subprocess.Popen[bytes] | None) -> float:
    if process is None:
        return 0.0
    times = psutil.Process(process.pid).cpu_times()
    return float(times.user + times.system)


@contextmanager
def _subscriber(args: argparse.Namespace, prefix: str) -> Iterator[subprocess.Popen[bytes] | None]:
    if not args.subscriber:
        yield None
        return
    code = (
        "import sys, redis\n"
        "p = redis.Redis.from_url(sys.argv[1]).pubsub(ignore_subscribe_messages=True)\n"
        "p.psubscribe(sys.argv[2] + '*')\n"
        "print('ready', flush=True)\n"
        "for m in p.listen(): pass\n"
    )
    process = subprocess.Popen(
        [sys.executable, "-c", code, args.redis_url, prefix], stdout=subprocess.PIPE
    )
    try:
        assert process.stdout is not None
        process.stdout.readline()  # subscribed
        yield process
    finally:
        process.terminate()
        process.wait(10)


# --- the parent: a private Redis, the variants interleaved, the table ---------------------------


@contextmanager
def private_redis() -> Iterator[tuple[str, int]]:
    """A throwaway ``redis-server`` on a free loopback port: (url, pid)."""
    server = shutil.which("redis-server")
    if server is None:
        raise SystemExit("redis-server is not installed; pass --redis-url")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    workdir = tempfile.mkdtemp(prefix="redis-micro-")
    process = subprocess.Popen(
        [
            server,
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            workdir,
        ],
        stdout=subprocess.DEVNULL,
    )
    url = f"redis://127.0.0.1:{port}/0"
    try:
        _wait_for_ping(port)
        yield url, process.pid
    finally:
        process.terminate()
        process.wait(10)
        shutil.rmtree(workdir, ignore_errors=True)


def _wait_for_ping(port: int) -> None:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
                s.sendall(b"PING\r\n")
                if s.recv(16).startswith(b"+PONG"):
                    return
        except OSError:
            pass
        time.sleep(0.05)
    raise SystemExit("the private redis-server did not answer PING")


def _measure(root: Path, url: str, args: argparse.Namespace) -> dict[str, Any]:
    command = [sys.executable, "-P", str(HERE), "--worker", "--redis-url", url]
    command += ["--results", str(args.results), "--batch", str(args.batch)]
    command += ["--tenants", str(args.tenants), "--mode", args.mode]
    command += ["--subscriber"] * args.subscriber + ["--no-hiredis"] * args.no_hiredis
    env = {**os.environ, "PYTHONPATH": str(root)}
    out = subprocess.run(command, env=env, check=True, capture_output=True, text=True).stdout
    measured: dict[str, Any] = json.loads(out.strip().splitlines()[-1])
    return measured


def _flushall(url: str) -> None:
    import redis

    redis.Redis.from_url(url).flushall()


def _summary(values: Sequence[float]) -> str:
    return f"{statistics.median(values):7.2f} [{min(values):6.2f}..{max(values):6.2f}]"


def run(args: argparse.Namespace) -> None:
    variants = [tuple(v.split("=", 1)) for v in args.variant] or [("this", str(REPO))]
    with _redis_url(args) as url:
        results: dict[str, list[dict[str, Any]]] = {name: [] for name, _ in variants}
        for round_ in range(args.rounds):
            order = variants if round_ % 2 == 0 else variants[::-1]
            for name, root in order:
                _flushall(url)
                results[name].append(_measure(Path(root), url, args))
    load = os.getloadavg()
    print(
        f"persist µs/result, median [min..max] of {args.rounds} rounds; {args.results:,} results "
        f"in batches of {args.batch}, {args.tenants} tenant(s), mode {args.mode}, "
        f"hiredis {'off' if args.no_hiredis else 'on'}; load average {load[0]:.2f} after"
    )
    columns = ["persist_us", "redis_us", "wall_us"] + ["subscriber_us"] * args.subscriber
    print(f"{'variant':<10}" + "".join(f"{c:>24}" for c in columns))
    for name, runs in results.items():
        cells = "".join(f"{_summary([r[c] for r in runs]):>24}" for c in columns)
        print(f"{name:<10}{cells}")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "results": results}, indent=1))


@contextmanager
def _redis_url(args: argparse.Namespace) -> Iterator[str]:
    if args.redis_url:
        yield args.redis_url
        return
    with private_redis() as (url, _pid):
        yield url


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench.redis_micro", description=__doc__)
    parser.add_argument("--variant", action="append", default=[], metavar="NAME=ROOT")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--results", type=int, default=20_000)
    parser.add_argument("--batch", type=int, default=1000)
    parser.add_argument("--tenants", type=int, default=1)
    parser.add_argument("--mode", choices=["persist", "store"], default="persist")
    parser.add_argument("--subscriber", action="store_true")
    parser.add_argument("--no-hiredis", action="store_true")
    parser.add_argument("--redis-url", default="")
    parser.add_argument("--json", default="", help="also write every measurement here")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.worker:
        print(json.dumps(_worker(args)))
    else:
        run(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())

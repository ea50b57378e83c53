"""HTTP ingest benchmark: one ingest process, the pipeline running behind it. Not a test.

    .venv/bin/streaminfer up --wait          # Kafka, Redis, topics, stages and the ingest API
    .venv/bin/python bench/ingest_bench.py   # [--url http://127.0.0.1:8000] [--duration 10]

Three runs against ``POST /v1/requests`` (every 202 means Kafka acknowledged the records):

1. single-request bodies, as fast as possible: requests/s and latency p50/p99;
2. 100-request bodies, as fast as possible: requests/s (bodies/s x 100);
3. single-request bodies at a fixed 2,000/s (open loop: latency counts from the moment a
   request was due, so a stalled server cannot hide its queueing): p50/p99.

Each run also reports the CPU the server spent per request (user + system time of the
processes listening on the URL's port and their children, librdkafka's threads included,
over the run): on a shared machine, rates move with the neighbours' load, CPU per request
much less. The load average is printed before and after.

The closed-loop runs use ``wrk`` when installed (``apt-get install wrk``; C, so the load
generator costs little CPU) and otherwise the asyncio client below. Targets (issue 14):
>= 5,000 single POSTs/s, >= 50,000 requests/s batched, p99 <= 20 ms at 2,000/s. The load
generator shares the machine with the server, the stages, Kafka and Redis: on a small box
the numbers say as much about that sharing as about the API.

``--ingest-only``: do not wait for the stages to drain between runs (an ingest served alone,
e.g. under its own ``STREAMINFER_KAFKA_TOPIC_PREFIX`` with no stages behind it).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import numpy as np
import psutil

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from streaminfer.settings import Settings  # noqa: E402

PIXELS = [float(i % 17) for i in range(64)]


def request_body(batch: int) -> bytes:
    one = {"model": "digits", "inputs": {"input": PIXELS}}
    return json.dumps(one if batch == 1 else [one] * batch).encode()


@dataclass
class Run:
    """One benchmark run's outcome."""

    name: str
    bodies: int = 0
    requests_per_body: int = 1
    seconds: float = 0.0
    errors: int = 0
    latencies_ms: list[float] = field(default_factory=list)
    p50_ms: float | None = None
    p99_ms: float | None = None
    server_cpu_s: float | None = None  # the server's CPU time over the run

    @property
    def cpu_us_per_request(self) -> float | None:
        requests = self.bodies * self.requests_per_body
        if self.server_cpu_s is None or not requests:
            return None
        return self.server_cpu_s * 1e6 / requests

    @property
    def requests_per_s(self) -> float:
        return self.bodies * self.requests_per_body / self.seconds if self.seconds else 0.0

    def percentiles(self) -> None:
        if self.latencies_ms:
            self.p50_ms, self.p99_ms = (
                float(p) for p in np.percentile(self.latencies_ms, [50, 99])
            )


# --- a minimal keep-alive HTTP/1.1 client (enough for fixed bodies and JSON answers) ----


class Connection:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._reader = reader
        self._writer = writer

    @classmethod
    async def open(cls, host: str, port: int) -> Connection:
        return cls(*await asyncio.open_connection(host, port))

    async def post(self, raw_request: bytes) -> int:
        self._writer.write(raw_request)
        head = await self._reader.readuntil(b"\r\n\r\n")
        status = int(head[9:12])
        length = re.search(rb"(?i)content-length:\s*(\d+)", head)
        await self._reader.readexactly(int(length.group(1)) if length else 0)
        return status

    def close(self) -> None:
        self._writer.close()


def raw_post(host: str, port: int, body: bytes) -> bytes:
    head = (
        f"POST /v1/requests HTTP/1.1\r\nHost: {host}:{port}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    )
    return head.encode() + body


async def closed_loop(url: str, body: bytes, *, connections: int, seconds: float) -> Run:
    """Each connection sends its next request as soon as the previous one was answered."""
    parts = urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    raw = raw_post(host, port, body)
    run = Run("closed")
    deadline = time.perf_counter() + seconds

    async def worker() -> None:
        conn = await Connection.open(host, port)
        while time.perf_counter() < deadline:
            sent = time.perf_counter()
            status = await conn.post(raw)
            run.latencies_ms.append((time.perf_counter() - sent) * 1000)
            run.bodies += 1
            run.errors += status != 202
        conn.close()

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(connections)))
    run.seconds = time.perf_counter() - started
    return run


async def open_loop(url: str, body: bytes, *, rate: float, seconds: float, pool: int) -> Run:
    """Requests due at a fixed rate; latency counts from when each was due."""
    parts = urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    raw = raw_post(host, port, body)
    idle: asyncio.Queue[Connection] = asyncio.Queue()
    for _ in range(pool):
        idle.put_nowait(await Connection.open(host, port))
    run = Run("open")

    async def one(due: float) -> None:
        conn = await idle.get()
        status = await conn.post(raw)
        run.latencies_ms.append((time.perf_counter() - due) * 1000)
        run.bodies += 1
        run.errors += status != 202
        idle.put_nowait(conn)

    started = time.perf_counter()
    tasks = []
    for i in range(int(rate * seconds)):
        due = started + i / rate
        delay = due - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)  # pacing the load generator, not waiting on a condition
        tasks.append(asyncio.create_task(one(due)))
    await asyncio.gather(*tasks)
    run.seconds = time.perf_counter() - started
    while not idle.empty():
        idle.get_nowait().close()
    return run


# --- wrk ---------------------------------------------------------------------------------


def wrk(url: str, body: bytes, *, connections: int, seconds: float) -> Run:
    """``wrk`` (one thread) posting ``body``; parses its rate, latency and error counts."""
    with tempfile.TemporaryDirectory() as tmp:
        body_file = Path(tmp) / "body.json"
        body_file.write_bytes(body)
        script = Path(tmp) / "post.lua"
        script.write_text(
            'wrk.method = "POST"\n'
            'wrk.headers["Content-Type"] = "application/json"\n'
            f'local f = io.open("{body_file}", "rb"); wrk.body = f:read("*a"); f:close()\n'
        )
        out = subprocess.run(
            [
                "wrk",
                "-t1",
                f"-c{connections}",
                f"-d{seconds:.0f}s",
                "--latency",
                "--timeout",
                "30s",  # wrk's default (2 s) would count slow answers as socket errors
                "-s",
                str(script),
                f"{url}/v1/requests",
            ],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    run = Run("wrk")
    total = re.search(r"(\d+) requests in ([\d.]+)(m?s)", out)
    if total:
        run.bodies = int(total.group(1))
        run.seconds = float(total.group(2)) / (1000 if total.group(3) == "ms" else 1)
    non_2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    errors = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    run.errors = (int(non_2xx.group(1)) if non_2xx else 0) + (
        sum(int(g) for g in errors.groups()) if errors else 0
    )
    run.p50_ms = _wrk_ms(out, "50%")
    run.p99_ms = _wrk_ms(out, "99%")
    return run


def _wrk_ms(out: str, percentile: str) -> float | None:
    found = re.search(rf"^\s*{percentile}\s+([\d.]+)(us|ms|s)\s*$", out, re.MULTILINE)
    if not found:
        return None
    scale = {"us": 0.001, "ms": 1.0, "s": 1000.0}[found.group(2)]
    return float(found.group(1)) * scale


# --- the server's CPU --------------------------------------------------------------------


def server_processes(port: int) -> list[psutil.Process]:
    """The processes listening on ``port`` and their children (uvicorn's workers)."""
    found: dict[int, psutil.Process] = {}
    for conn in psutil.net_connections(kind="tcp"):
        listening = conn.status == psutil.CONN_LISTEN and conn.laddr and conn.laddr.port == port
        if listening and conn.pid is not None:
            process = psutil.Process(conn.pid)
            for member in [process, *process.children(recursive=True)]:
                found[member.pid] = member
    return list(found.values())


def cpu_seconds(processes: list[psutil.Process]) -> float:
    total = 0.0
    for process in processes:
        try:
            times = process.cpu_times()
        except psutil.NoSuchProcess:
            continue
        total += times.user + times.system
    return total


def measured(url: str, run: Callable[[], Run]) -> Run:
    """``run()``, with the server's CPU time over it when its processes can be seen."""
    port = urlsplit(url).port or 80
    try:
        processes = server_processes(port)
    except psutil.AccessDenied:  # other users' sockets: no CPU figure, the rest stands
        processes = []
    before = cpu_seconds(processes)
    result = run()
    if processes:
        result.server_cpu_s = cpu_seconds(processes) - before
    return result


def load_average() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


# --- main ---------------------------------------------------------------------------------


def closed(args: argparse.Namespace, body: bytes, per_body: int, name: str) -> Run:
    def go() -> Run:
        if shutil.which("wrk") and not args.python_client:
            return wrk(args.url, body, connections=args.connections, seconds=args.duration)
        run = asyncio.run(
            closed_loop(args.url, body, connections=args.connections, seconds=args.duration)
        )
        run.percentiles()
        return run

    run = measured(args.url, go)
    run.name, run.requests_per_body = name, per_body
    return run


def report(runs: list[Run], rate: float) -> list[str]:
    single, batched, paced = runs
    rows = [
        (
            "single POSTs/s",
            f"{single.requests_per_s:,.0f}",
            ">= 5,000",
            single.requests_per_s >= 5000,
        ),
        (
            "batched requests/s",
            f"{batched.requests_per_s:,.0f}",
            ">= 50,000",
            batched.requests_per_s >= 50_000,
        ),
        (
            f"p99 at {rate:,.0f}/s",
            f"{paced.p99_ms:.1f} ms",
            "<= 20 ms",
            (paced.p99_ms or 1e9) <= 20,
        ),
    ]
    rows += [
        (f"server CPU µs/req, {label}", f"{run.cpu_us_per_request:,.0f}", "", True)
        for label, run in zip(("single", "batched", "paced"), runs, strict=True)
        if run.cpu_us_per_request is not None
    ]
    lines = [f"{'metric':<28} {'measured':>12} {'target':>10}  met"]
    lines += [
        f"{m:<28} {v:>12} {t:>10}  {('yes' if ok else 'NO') if t else ''}" for m, v, t, ok in rows
    ]
    lines.append("")
    for run in runs:
        p50 = f"{run.p50_ms:.1f}" if run.p50_ms is not None else "-"
        p99 = f"{run.p99_ms:.1f}" if run.p99_ms is not None else "-"
        lines.append(
            f"{run.name:<22} bodies {run.bodies:>8}  {run.requests_per_s:>10,.0f} req/s  "
            f"p50 {p50} ms  p99 {p99} ms  errors {run.errors}"
        )
    return lines


def lag(settings: Settings) -> int:
    """Records the stages have not committed yet, summed over their input topics."""
    from kafkaio.offsets import group_backlog
    from streaminfer.kafka import make_consumer
    from streaminfer.wiring import STAGE_NAMES, input_topics

    behind = 0
    for stage in STAGE_NAMES:
        # Reading a group's committed offsets does not join the group.
        consumer = make_consumer(settings, group_id=settings.group_id(stage))
        try:
            for topic in input_topics(settings, stage):
                backlog = group_backlog(consumer, topic)
                # -1: a transaction's commit marker takes an offset nobody consumes
                behind += sum(max(0, offsets - 1) for offsets in backlog.values())
        finally:
            consumer.close()
    return behind


def wait_drained(settings: Settings, timeout_s: float = 600.0) -> float:
    """Block until the pipeline caught up with what the previous runs sent; seconds taken."""
    started = time.monotonic()
    while lag(settings) > 0:
        if time.monotonic() - started > timeout_s:
            raise TimeoutError(f"the pipeline did not drain in {timeout_s}s")
        time.sleep(1)
    return time.monotonic() - started


def ready(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/readyz", timeout=5) as answer:
            return bool(answer.status == 200)
    except OSError:
        return False


def main() -> int:
    settings = Settings()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", default=f"http://127.0.0.1:{settings.ingest.port}")
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per run")
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--rate", type=float, default=2000.0, help="paced run, requests/s")
    parser.add_argument("--batch", type=int, default=100)
    parser.add_argument("--python-client", action="store_true", help="do not use wrk")
    parser.add_argument(
        "--ingest-only", action="store_true", help="no stages behind: do not wait for them"
    )
    args = parser.parse_args()
    if not ready(args.url):
        print(f"{args.url}/readyz is not ready: run `streaminfer up --wait` first", file=sys.stderr)
        return 2
    print(f"load average before: {load_average()}")
    runs = [closed(args, request_body(1), 1, "single, max rate")]
    drain(settings, args)
    runs.append(
        closed(args, request_body(args.batch), args.batch, f"batch of {args.batch}, max rate")
    )
    # The paced run measures the API at a steady rate, not behind the backlog of the last run.
    drain(settings, args)
    paced = measured(
        args.url,
        lambda: asyncio.run(
            open_loop(args.url, request_body(1), rate=args.rate, seconds=args.duration, pool=64)
        ),
    )
    paced.name = f"single at {args.rate:,.0f}/s"
    paced.percentiles()
    runs.append(paced)
    print("\n".join(report(runs, args.rate)))
    print(f"load average after: {load_average()}")
    return 0


def drain(settings: Settings, args: argparse.Namespace) -> None:
    if not args.ingest_only:
        print(f"pipeline drained in {wait_drained(settings):.0f}s", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())

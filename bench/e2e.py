"""``streaminfer bench``: end-to-end throughput and latency of the pipeline, and of the same
chain written with faust-streaming and Quix Streams, measured in one run.

For every pipeline (ours per ``--guarantee``, then the peers with ``--peers``): fresh topics
under its own prefix, three stage processes, a warm-up round trip (which is also the
readiness check), then the scenarios: open loop at each ``--rates`` value for
``--duration`` seconds, and closed loop for ``--count`` requests. Per scenario: results/s
at the end of the chain, latency ``created_at -> stored_at``, CPU seconds and peak RSS of
every stage process (and of Kafka, Redis and the load generator, for the CPU breakdown).
The report goes to ``--out`` (JSON and PNG) and a table to stdout (``bench/report.py``).

Latency is also measured from outside the pipeline (``outside_in_ms`` per scenario): a
subscriber of the pipeline's Redis notification channels (:class:`Arrivals`) stamps each id
when it hears of it, and the latency is that arrival time less the request's ``created_at``,
so it includes what ``stored_at`` does not (the notification's trip, and nothing a stage
stamps for itself).
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import multiprocessing
import os
import time
import uuid
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import numpy as np
import redis

from bench.driver import Driver, Measurement
from bench.options import BenchOptions, ScenarioSpec, options_from_args
from bench.pipelines import PipelineSpec, ResourceSampler, StageProcesses, service_pids
from bench.profile import StageProfiler
from bench.report import machine_info, summarise, write_outputs
from schemas import Topics
from schemas.keys import ResultKeys, ready_ids
from streaminfer import stack
from streaminfer.kafka import create_topics
from streaminfer.settings import Settings

log = logging.getLogger(__name__)


def run_cli(settings: Settings, args: argparse.Namespace) -> int:
    """Handler of ``streaminfer bench``; exit 1 when any request did not come back."""
    report = run_bench(settings, options_from_args(args))
    lost = sum(s["lost"] for run in report["runs"] for s in run["scenarios"])
    return 1 if lost else 0


def run_bench(settings: Settings, options: BenchOptions) -> dict[str, Any]:
    """Every pipeline and scenario of ``options``; writes and returns the report."""
    started = _ensure_services(settings)
    load_before = os.getloadavg()
    run_id = time.strftime("%Y%m%d-%H%M%S") + "-" + uuid.uuid4().hex[:4]
    specs = [PipelineSpec("ours", g, f"bench-{run_id}-ours-{g[:3]}.") for g in options.guarantees]
    peer_guarantee = options.guarantees[0]
    specs += [
        PipelineSpec("ours", peer_guarantee, f"bench-{run_id}-v{i}.", variant=name, env=env)
        for i, (name, env) in enumerate(options.variants)
    ]
    specs += [PipelineSpec(p, peer_guarantee, f"bench-{run_id}-{p}.") for p in options.peers]
    runs: list[dict[str, Any]] = []
    try:
        for spec in specs:
            print(f"== {spec.label}", flush=True)
            # Stage logs and raw profiles are scratch: under run_dir, not next to the report.
            scratch = settings.run_dir / "bench" / run_id
            runs.append(_run_or_note(settings, spec, options, scratch))
    finally:
        if started:
            stack.down(settings, only=started, echo=log.info)
    report = {
        "run_id": run_id,
        "machine": machine_info(load_before, os.getloadavg()),
        "settings": _settings_summary(settings),
        "options": _options(options),
        "runs": runs,
    }
    write_outputs(report, options.out_dir, run_id)
    return report


def _run_or_note(
    settings: Settings, spec: PipelineSpec, options: BenchOptions, log_dir: Path
) -> dict[str, Any]:
    """``run_pipeline``; a peer that fails is noted in the report and the run goes on."""
    if spec.name == "ours":
        return run_pipeline(settings, spec, options, log_dir)
    try:
        return run_pipeline(settings, spec, options, log_dir)
    except Exception as exc:
        log.exception("%s failed", spec.label)
        return {
            "pipeline": spec.name,
            "guarantee": spec.guarantee,
            "scenarios": [],
            "error": str(exc),
        }


def run_pipeline(
    settings: Settings, spec: PipelineSpec, options: BenchOptions, log_dir: Path
) -> dict[str, Any]:
    """Start ``spec``'s stages on fresh topics, warm up, run every scenario, stop."""
    topics = Topics(prefix=spec.prefix)
    create_topics(settings.with_changes(kafka={"topic_prefix": spec.prefix}))
    procs = StageProcesses(spec=spec, settings=settings, log_dir=log_dir)
    procs.start()
    driver = Driver(settings, topics)
    arrivals = Arrivals(settings.redis.url.get_secret_value(), ResultKeys(prefix=spec.prefix))
    try:
        _warm_up(driver, procs, options)
        pids = {**procs.pids(), **service_pids(settings), "driver": os.getpid()}
        scenarios = [
            _measure(driver, procs, pids, scenario, options, arrivals)
            for scenario in options.scenarios()
        ]
    finally:
        arrivals.close()
        driver.close()
        procs.stop()
    return {
        "pipeline": spec.name,
        "variant": spec.variant,
        "env": dict(spec.env),
        "guarantee": spec.guarantee,
        "scenarios": scenarios,
    }


def _warm_up(driver: Driver, procs: StageProcesses, options: BenchOptions) -> None:
    """A closed-loop round trip: the stages have joined, loaded the model and answered."""
    deadline = time.monotonic() + 120
    while True:
        procs.check_alive()
        warm = driver.run(ScenarioSpec("warm-up", count=options.warmup), timeout_s=20)
        if len(warm.stored) == warm.sent:
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"{procs.spec.label}: warm-up did not come back in 120 s")


def _measure(
    driver: Driver,
    procs: StageProcesses,
    pids: dict[str, int],
    scenario: ScenarioSpec,
    options: BenchOptions,
    arrivals: Arrivals,
) -> dict[str, Any]:
    profiler = None
    if options.profile and scenario.kind == "closed":
        profiler = StageProfiler(pids, procs.log_dir, procs.spec.label)
        profiler.start()
    with ResourceSampler(pids) as sampler:
        measurement: Measurement = driver.run(scenario, timeout_s=options.timeout_s)
        usage = sampler.usage()
    procs.check_alive()
    summary = summarise(measurement, usage, load=os.getloadavg())
    summary["outside_in_ms"] = arrivals.latencies_ms(measurement)
    if profiler is not None:
        summary["profile"] = profiler.stop()
    hops = " ".join(f"{k} {v:.1f}" for k, v in summary["hops_median_ms"].items())
    outside = summary["outside_in_ms"]
    print(
        f"   {scenario.name:<14} {summary['results_per_s']:>9,.0f} results/s  "
        f"p99 {summary['latency_ms']['p99']:.1f} ms (outside-in {outside['p99']:.1f})  "
        f"lost {summary['lost']}  median ms: {hops}",
        flush=True,
    )
    return summary


class Arrivals:
    """When each id was announced, as a client of the pipeline hears of it: a process of its
    own (so the load generator's work never delays a stamp) pattern-subscribed to every
    tenant's notification channel under the pipeline's prefix.

    Also understands the per-id channels of checkouts before batch notifications
    (``<prefix>result-ready:<tenant>:<id>``, the id in the channel name), so a ``--variant``
    of an older commit is measured the same way."""

    def __init__(self, url: str, keys: ResultKeys) -> None:
        context = multiprocessing.get_context("spawn")  # no fork of librdkafka's threads
        self._conn, child = context.Pipe()
        self._process = context.Process(
            target=_listen, args=(url, keys.prefix, child), name="arrivals", daemon=True
        )
        self._process.start()
        deadline = time.monotonic() + 60
        while not self._conn.poll(0.2):
            if not self._process.is_alive() or time.monotonic() > deadline:
                self.close()
                raise RuntimeError("the arrivals subscriber did not subscribe (see above)")
        self._conn.recv()
        self.at: dict[str, float] = {}

    def latencies_ms(self, m: Measurement) -> dict[str, float]:
        """Percentiles of arrival - created_at over the ids ``m`` stored, and how many of them
        were heard of (``count``)."""
        self._conn.send("collect")
        for request_id, at in self._conn.recv().items():
            self.at.setdefault(request_id, at)  # the first arrival (a replay comes again)
        arrived = [(self.at.get(i), c) for i, c in zip(m.ids, m.created, strict=True)]
        ms = np.asarray([(a - c) * 1000.0 for a, c in arrived if a is not None])
        if not ms.size:
            return {"count": 0, "p50": float("nan"), "p99": float("nan"), "max": float("nan")}
        p50, p99 = np.percentile(ms, [50, 99])
        return {"count": int(ms.size), "p50": float(p50), "p99": float(p99), "max": float(ms.max())}

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self._conn.send("stop")
        self._process.join(10)
        if self._process.is_alive():
            self._process.terminate()


OLD_CHANNELS = "result-ready:"  # per-id channels, before batch notifications


def _listen(url: str, prefix: str, conn: Connection) -> None:
    """The arrivals process: stamp ids as notifications come; on "collect" send the stamps
    made since the last one, on "stop" return."""
    pubsub = redis.Redis.from_url(url).pubsub()
    batches, per_id = ResultKeys(prefix=prefix).channel_pattern(), f"{prefix}{OLD_CHANNELS}*"
    pubsub.psubscribe(batches, per_id)
    confirmed = 0
    while confirmed < 2:
        message = pubsub.get_message(timeout=1.0)
        confirmed += message is not None and message["type"] == "psubscribe"
    conn.send("subscribed")
    old_prefix = len(prefix) + len(OLD_CHANNELS)
    at: dict[str, float] = {}
    while True:
        message = pubsub.get_message(timeout=0.05)
        if message is not None and message["type"] == "pmessage":
            _stamp(
                at,
                message,
                time.time(),
                batch=message["pattern"] == batches.encode(),
                skip=old_prefix,
            )
        if conn.poll():
            if conn.recv() == "stop":
                return
            conn.send(at)
            at = {}


def _stamp(
    at: dict[str, float], message: dict[str, Any], now: float, *, batch: bool, skip: int
) -> None:
    if batch:
        with contextlib.suppress(ValueError):
            for request_id in ready_ids(message["data"]):
                at.setdefault(request_id, now)
        return
    # <prefix>result-ready:<tenant>:<id>: the tenant segment is percent-encoded (no colon).
    request_id = message["channel"][skip:].partition(b":")[2]
    at.setdefault(request_id.decode("utf-8", errors="replace"), now)


def _ensure_services(settings: Settings) -> list[str]:
    """Start Kafka and Redis unless running (or external); returns what was started here."""
    started = []
    for service in stack.SERVICES:
        if service.managed(settings) and not service.running(settings):
            service.start(settings)
            started.append(service.name)
    return started


def _settings_summary(settings: Settings) -> dict[str, Any]:
    stage, kafka = settings.stage, settings.kafka
    return {
        "batch_size": stage.batch_max_records,
        "batch_timeout_s": stage.batch_timeout_s,
        "linger_ms": kafka.linger_ms,
        "txn_max_records": stage.txn_max_records,
        "txn_max_interval_s": stage.txn_max_interval_s,
        "onnx_intra_op_threads": stage.onnx_intra_op_threads,
        "onnx_allow_spinning": stage.onnx_allow_spinning,
        "topic_partitions": kafka.topic_partitions,
    }


def _options(options: BenchOptions) -> dict[str, Any]:
    return {
        "guarantees": list(options.guarantees),
        "peers": list(options.peers),
        "rates": list(options.rates),
        "duration_s": options.duration_s,
        "count": options.count,
        "window": options.window,
    }

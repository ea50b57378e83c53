"""``streaminfer bench``: end-to-end throughput and latency of the pipeline, and of the same
chain written with faust-streaming and Quix Streams, measured in one run.

For every pipeline (ours per ``--guarantee``, then the peers with ``--peers``): fresh topics
under its own prefix, three stage processes, a warm-up round trip (which is also the
readiness check), then the scenarios: open loop at each ``--rates`` value for
``--duration`` seconds, and closed loop for ``--count`` requests. Per scenario: results/s
at the end of the chain, latency ``created_at -> stored_at``, CPU seconds and peak RSS of
every stage process (and of Kafka, Redis and the load generator, for the CPU breakdown).
The report goes to ``--out`` (JSON and PNG) and a table to stdout (``bench/report.py``).
"""

from __future__ import annotations

import argparse
import logging
import os
import time
import uuid
from pathlib import Path
from typing import Any

from bench.driver import Driver, Measurement
from bench.options import BenchOptions, ScenarioSpec, options_from_args
from bench.pipelines import PipelineSpec, ResourceSampler, StageProcesses, service_pids
from bench.profile import StageProfiler
from bench.report import machine_info, summarise, write_outputs
from schemas import Topics
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
    try:
        _warm_up(driver, procs, options)
        pids = {**procs.pids(), **service_pids(settings), "driver": os.getpid()}
        scenarios = [
            _measure(driver, procs, pids, scenario, options) for scenario in options.scenarios()
        ]
    finally:
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
    if profiler is not None:
        summary["profile"] = profiler.stop()
    hops = " ".join(f"{k} {v:.1f}" for k, v in summary["hops_median_ms"].items())
    print(
        f"   {scenario.name:<14} {summary['results_per_s']:>9,.0f} results/s  "
        f"p99 {summary['latency_ms']['p99']:.1f} ms  lost {summary['lost']}  "
        f"median ms: {hops}",
        flush=True,
    )
    return summary


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

"""Swap and shadow benchmark: what a live model change costs the traffic that flows through it.

``python -m bench.swap_bench [--rate 1000] [--duration 20]`` starts validate, infer and
persist on fresh topics (the checkout's model repository, digits versions 1 and 2) and runs
three open-loop scenarios at ``--rate`` requests/s for ``--duration`` seconds each:

1. ``steady``: all traffic to version 1, version 2 not loaded.
2. ``shadow``: the same, with version 2 as the shadow (it runs on every batch too).
3. ``swap``: version 2 not loaded; half-way through, ``models promote digits 2`` (version 2
   is loaded and warmed in the background, then traffic switches between two batches).

Latency is ``created_at -> stored_at`` of every request (the driver of ``bench/e2e.py``).
For ``swap`` the report also gives p99 over the two seconds after the command and a
per-second p99 timeline around it; for ``shadow`` the infer process's CPU seconds per
result, against ``steady``'s. Results go to ``--out`` as JSON and a table to stdout.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np

from bench.driver import Driver, Measurement
from bench.options import ScenarioSpec
from bench.pipelines import PipelineSpec, ResourceSampler, StageProcesses
from bench.report import machine_info, summarise
from schemas import Topics
from schemas.control import ModelState, promote, shadow, unload
from schemas.models import ModelSpec
from streaminfer import models_cli
from streaminfer.kafka import create_topics
from streaminfer.settings import REPO_ROOT, Settings

log = logging.getLogger(__name__)


def _command(settings: Settings, apply: Any, *args: Any) -> float:
    """Run one control command (as ``streaminfer models`` does); returns when it started."""

    def change(state: ModelState, spec: ModelSpec, now: float, who: str) -> ModelState:
        return apply(state, spec, *args, now=now, who=who)

    started = time.time()
    models_cli.change(settings, "digits", change)
    return started


def _scenario(
    driver: Driver,
    procs: StageProcesses,
    name: str,
    rate: float,
    duration_s: float,
    during: Any = None,
) -> tuple[dict[str, Any], Measurement, float | None]:
    """One open-loop run; ``during`` (a callable returning a time) runs half-way through."""
    spec = ScenarioSpec(name, count=int(rate * duration_s), rate=rate)
    commanded: list[float] = []
    timer = None
    if during is not None:
        timer = threading.Timer(duration_s / 2, lambda: commanded.append(during()))
        timer.start()
    with ResourceSampler(procs.pids()) as sampler:
        measurement = driver.run(spec, timeout_s=60)
        usage = sampler.usage()
    if timer is not None:
        timer.join()
    procs.check_alive()
    summary = summarise(measurement, usage, load=os.getloadavg())
    summary.pop("cdf_ms", None)
    return summary, measurement, commanded[0] if commanded else None


def _around(m: Measurement, at: float) -> dict[str, Any]:
    """p99 (ms) of the requests created in the 2 s after ``at``, and per second around it."""
    created = np.asarray(m.created)
    latency = m.latencies_ms
    after = latency[(created >= at) & (created < at + 2.0)]
    timeline = {}
    for second in range(-4, 6):
        mask = (created >= at + second) & (created < at + second + 1)
        if mask.any():
            timeline[f"{second:+d}s"] = round(float(np.percentile(latency[mask], 99)), 1)
    return {
        "p99_2s_after_ms": round(float(np.percentile(after, 99)), 1) if after.size else None,
        "max_2s_after_ms": round(float(after.max()), 1) if after.size else None,
        "p99_per_second_ms": timeline,
    }


def run(settings: Settings, *, rate: float, duration_s: float, out: Path) -> dict[str, Any]:
    run_id = time.strftime("%Y%m%d-%H%M%S") + "-" + uuid.uuid4().hex[:4]
    prefix = f"bench-{run_id}-swap."
    ours = settings.with_changes(kafka={"topic_prefix": prefix})
    create_topics(ours)
    _command(ours, _unload, "2")  # v1 only: the swap must load v2 while v1 serves
    spec = PipelineSpec("ours", settings.stage.processing_guarantee, prefix)
    procs = StageProcesses(
        spec=spec, settings=settings, log_dir=settings.run_dir / "bench" / run_id
    )
    procs.start()
    driver = Driver(settings, Topics(prefix=prefix))
    load_before = os.getloadavg()
    report: dict[str, Any] = {"rate": rate, "duration_s": duration_s, "scenarios": {}}
    try:
        _warm_up(driver, procs)
        steady, _, _ = _scenario(driver, procs, "steady", rate, duration_s)
        _command(ours, shadow, "2")
        shadowed, _, _ = _scenario(driver, procs, "shadow", rate, duration_s)
        _command(ours, shadow, None)
        _command(ours, _unload, "2")
        swap, measured, at = _scenario(
            driver, procs, "swap", rate, duration_s, during=lambda: _command(ours, promote, "2")
        )
        assert at is not None
        swap["around_swap"] = _around(measured, at)
        report["scenarios"] = {"steady": steady, "shadow": shadowed, "swap": swap}
    finally:
        driver.close()
        procs.stop()
    report["machine"] = machine_info(load_before, os.getloadavg())
    out.mkdir(parents=True, exist_ok=True)
    (out / f"swap-{run_id}.json").write_text(json.dumps(report, indent=2))
    print(table(report))
    return report


def _unload(state: ModelState, _spec: ModelSpec, version: str, **kw: Any) -> ModelState:
    return unload(state, version, **kw) if version in state.loaded else state


def _warm_up(driver: Driver, procs: StageProcesses) -> None:
    """Round trips until one comes back whole: the stages joined and loaded the model."""
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        procs.check_alive()
        warm = driver.run(ScenarioSpec("warm-up", count=500), timeout_s=20)
        if len(warm.stored) == warm.sent:
            return
    raise TimeoutError("warm-up did not come back in 120 s")


def _cpu_per_result_ms(summary: dict[str, Any]) -> float:
    return 1000 * summary["processes"]["infer"]["cpu_s"] / max(summary["stored"], 1)


def table(report: dict[str, Any]) -> str:
    scenarios = report["scenarios"]
    lines = [
        f"swap benchmark: {report['rate']:.0f} req/s, {report['duration_s']:.0f} s per scenario",
        f"{'scenario':<8} {'results':>8} {'lost':>5} {'p50 ms':>8} {'p99 ms':>8} {'max ms':>8} "
        f"{'infer CPU ms/result':>20}",
    ]
    for name, s in scenarios.items():
        lat = s["latency_ms"]
        lines.append(
            f"{name:<8} {s['stored']:>8} {s['lost']:>5} {lat['p50']:>8.1f} {lat['p99']:>8.1f} "
            f"{lat['max']:>8.1f} {_cpu_per_result_ms(s):>20.3f}"
        )
    around = scenarios["swap"]["around_swap"]
    lines.append(
        f"swap: p99 in the 2 s after the command {around['p99_2s_after_ms']} ms "
        f"(max {around['max_2s_after_ms']} ms); p99 per second around it: "
        + " ".join(f"{k} {v}" for k, v in around["p99_per_second_ms"].items())
    )
    extra = _cpu_per_result_ms(scenarios["shadow"]) / max(
        _cpu_per_result_ms(scenarios["steady"]), 1e-9
    )
    lines.append(f"shadow: infer CPU per result x{extra:.2f} of steady")
    machine = report["machine"]
    lines.append(f"machine: {machine}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.swap_bench", description=__doc__)
    parser.add_argument("--rate", type=float, default=1000.0)
    parser.add_argument("--duration", type=float, default=20.0)
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "bench" / "results")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(message)s")
    report = run(Settings(), rate=args.rate, duration_s=args.duration, out=args.out)
    lost = sum(s["lost"] for s in report["scenarios"].values())
    return 1 if lost else 0


if __name__ == "__main__":
    raise SystemExit(main())

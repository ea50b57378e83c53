"""Turns measurements into the report: per-scenario summary, peer ratios, JSON, PNG, table."""

from __future__ import annotations

import json
import os
import platform
from pathlib import Path
from typing import Any

import numpy as np

from bench.driver import Measurement
from bench.pipelines import Usage

STAGE_NAMES = ("validate", "infer", "persist")
# Processes sampled besides a pipeline's own (bench/e2e.py): the broker, Redis and the load
# generator (this process). Every other sampled name is one of the pipeline's processes
# (validate/infer/persist in the split topology, e.g. ``fused`` (+ persist) in the fused one).
SERVICE_NAMES = ("kafka", "redis", "driver")
TIMELINE_BIN_S = 0.25


def summarise(
    m: Measurement, usage: dict[str, Usage], *, load: tuple[float, ...]
) -> dict[str, Any]:
    """One scenario's numbers (JSON-ready)."""
    lat = m.latencies_ms
    stored = len(m.stored)
    first = min(m.created) if m.created else m.started
    last = max(m.stored) if m.stored else m.started
    seconds = max(last - first, 1e-9)
    pct = np.percentile(lat, [50, 95, 99]) if lat.size else [float("nan")] * 3
    return {
        "scenario": m.spec.name,
        "kind": m.spec.kind,
        "rate": m.spec.rate,
        "sent": m.sent,
        "stored": stored,
        "lost": m.sent - stored,
        "duplicates": m.duplicates,
        "send_rate": m.sent / max(m.send_done - m.started, 1e-9),
        "seconds": seconds,
        "results_per_s": stored / seconds,
        "latency_ms": {
            "p50": float(pct[0]),
            "p95": float(pct[1]),
            "p99": float(pct[2]),
            "max": float(lat.max()) if lat.size else float("nan"),
        },
        "hops_median_ms": m.hops_ms,
        "cdf_ms": _cdf(lat),
        "timeline": _timeline(m.stored, first),
        "processes": {
            name: {
                "cpu_s": round(u.cpu_s, 3),
                "cpu_pct": round(100 * u.cpu_s / seconds, 1),
                "rss_max_mb": round(u.rss_max_mb, 1),
                "records_per_s": stored / seconds if _is_stage(name) else None,
                "records_per_cpu_s": stored / u.cpu_s if _is_stage(name) and u.cpu_s else None,
            }
            for name, u in usage.items()
        },
        "cpu_us_per_result": cpu_us_per_result({n: u.cpu_s for n, u in usage.items()}, stored),
        "load_avg_1m_after": load[0],
    }


def cpu_us_per_result(cpu_s: dict[str, float], stored: int) -> dict[str, float]:
    """CPU µs per stored result of each process over one scenario, and their ``total``;
    empty when nothing was stored.

    Every process is sampled over the same window (the scenario, stragglers included) and the
    pipelines run one at a time, so the broker's and Redis's share is this pipeline's, plus
    whatever else uses them meanwhile (other clients of a shared broker)."""
    if stored <= 0:
        return {}
    out = {name: round(seconds * 1e6 / stored, 1) for name, seconds in cpu_s.items()}
    out["total"] = round(sum(seconds * 1e6 / stored for seconds in cpu_s.values()), 1)
    return out


def _is_stage(name: str) -> bool:
    return name not in SERVICE_NAMES


def _cpu_budget(scenario: dict[str, Any]) -> dict[str, float]:
    """A scenario's ``cpu_us_per_result``, recomputed for reports written before it existed."""
    if "cpu_us_per_result" in scenario:
        budget: dict[str, float] = scenario["cpu_us_per_result"]
        return budget
    cpu_s = {name: p["cpu_s"] for name, p in scenario["processes"].items()}
    return cpu_us_per_result(cpu_s, scenario["stored"])


def _cdf(lat: np.ndarray, points: int = 200) -> list[float]:
    """Latency at ``points`` evenly spaced quantiles (enough to draw the CDF)."""
    if not lat.size:
        return []
    return [round(float(v), 3) for v in np.quantile(lat, np.linspace(0, 1, points))]


def _timeline(stored: list[float], start: float) -> list[float]:
    """Results per second in consecutive bins of ``TIMELINE_BIN_S`` from ``start``."""
    if not stored:
        return []
    rel = np.asarray(stored) - start
    bins = int(rel.max() // TIMELINE_BIN_S) + 1
    counts = np.bincount((rel // TIMELINE_BIN_S).astype(int).clip(0), minlength=bins)
    return [float(c / TIMELINE_BIN_S) for c in counts]


def machine_info(load_before: tuple[float, ...], load_after: tuple[float, ...]) -> dict[str, Any]:
    """Where the numbers came from, and how busy the machine was."""
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem_gb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return {
        "cpu": model,
        "cores": os.cpu_count(),
        "memory_gb": round(mem_gb, 1),
        "python": platform.python_version(),
        "kernel": platform.release(),
        "load_avg_before": [round(x, 2) for x in load_before],
        "load_avg_after": [round(x, 2) for x in load_after],
    }


def ratios(report: dict[str, Any]) -> dict[str, Any]:
    """ours ÷ peer for closed-loop results/s and for p99 at 2,000/s (p99 < 1 is better),
    and exactly-once ÷ at-least-once for ours (the price of exactly-once)."""
    found = {(r["pipeline"], r["guarantee"]): r for r in report["runs"] if not r.get("variant")}
    ours = next(
        (r for r in report["runs"] if r["pipeline"] == "ours" and not r.get("variant")), None
    )
    out: dict[str, Any] = {}
    if ours is None:
        return out
    for run in report["runs"]:
        if run is ours or (run["pipeline"], run.get("variant")) == ("ours", ""):
            continue
        out[f"ours/{_label(run)}"] = {
            "throughput": _div(_closed(ours), _closed(run)),
            "p99_at_2000": _div(_p99_at(ours, 2000.0), _p99_at(run, 2000.0)),
        }
    eos, alo = found.get(("ours", "exactly-once")), found.get(("ours", "at-least-once"))
    if eos and alo:
        out["ours eos/alo"] = {
            "throughput": _div(_closed(eos), _closed(alo)),
            "p99_at_2000": _div(_p99_at(eos, 2000.0), _p99_at(alo, 2000.0)),
        }
    return out


def _closed(run: dict[str, Any]) -> float | None:
    return next((s["results_per_s"] for s in run["scenarios"] if s["kind"] == "closed"), None)


def _p99_at(run: dict[str, Any], rate: float) -> float | None:
    return next((s["latency_ms"]["p99"] for s in run["scenarios"] if s["rate"] == rate), None)


def _div(a: float | None, b: float | None) -> float | None:
    return round(a / b, 2) if a is not None and b else None


def write_outputs(report: dict[str, Any], out_dir: Path, run_id: str) -> None:
    """``bench-<run>.json`` and ``bench-<run>.png`` in ``out_dir``; the table to stdout."""
    report["ratios"] = ratios(report)
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path = out_dir / f"bench-{run_id}.json"
    json_path.write_text(json.dumps(report, indent=1))
    png_path = out_dir / f"bench-{run_id}.png"
    plot(report, png_path)
    print(table(report))
    print(f"\nreport: {json_path}\nplot:   {png_path}")


def table(report: dict[str, Any]) -> str:
    """The human summary: one row per pipeline and scenario, the CPU budget per result, then
    the ratios."""
    heading, width = _stage_heading(report), _label_width(report)
    head = (
        f"{'pipeline':<{width}}{'scenario':<14}{'sent':>8}{'lost':>6}{'results/s':>11}"
        f"{'p50':>8}{'p95':>8}{'p99':>8}{'max':>8}  {'cpu% ' + heading:<22}rss MB {heading}"
    )
    lines = [head, "-" * len(head)]
    for run in report["runs"]:
        label = _label(run)
        if run.get("error"):
            lines.append(f"{label:<{width}}FAILED: {run['error'].splitlines()[0][:90]}")
        for s in run["scenarios"]:
            lat, procs = s["latency_ms"], s["processes"]
            stages = _stage_names(s)
            cpu = "/".join(f"{procs[n]['cpu_pct']:.0f}" for n in stages)
            rss = "/".join(f"{procs[n]['rss_max_mb']:.0f}" for n in stages)
            if _abbrev(stages) != heading:  # e.g. a fused variant next to split pipelines
                cpu, rss = f"{_abbrev(stages)} {cpu}", f"{_abbrev(stages)} {rss}"
            lines.append(
                f"{label:<{width}}{s['scenario']:<14}{s['sent']:>8}{s['lost']:>6}"
                f"{s['results_per_s']:>11,.0f}{lat['p50']:>8.1f}{lat['p95']:>8.1f}"
                f"{lat['p99']:>8.1f}{lat['max']:>8.1f}  {cpu:<22}{rss}"
            )
    lines += cpu_table(report)
    lines += _profile_lines(report)
    machine = report["machine"]
    lines.append(
        f"\nmachine: {machine['cpu']} x{machine['cores']}; load average before "
        f"{machine['load_avg_before']} after {machine['load_avg_after']}"
    )
    for name, r in report.get("ratios", {}).items():
        lines.append(
            f"ratio {name}: throughput {r['throughput']}, p99 at 2,000/s {r['p99_at_2000']}"
        )
    return "\n".join(lines)


# Column headings of the CPU budget for the non-stage processes.
_HEADINGS = {"kafka": "broker", "redis": "redis", "driver": "loadgen", "total": "total"}


def cpu_table(report: dict[str, Any]) -> list[str]:
    """CPU µs per stored result: one row per pipeline and scenario, one column per process
    (the union over the report: a pipeline without a process shows ``-``), then the total."""
    scenarios = [(run, s) for run in report["runs"] for s in run["scenarios"]]
    if not scenarios:
        return []
    names = process_columns([_cpu_budget(s) for _, s in scenarios])
    widths = [max(10, len(_HEADINGS.get(n, n)) + 2) for n in names]
    label_width = _label_width(report)
    head = f"{'pipeline':<{label_width}}{'scenario':<14}" + "".join(
        f"{_HEADINGS.get(n, n):>{w}}" for n, w in zip(names, widths, strict=True)
    )
    lines = [
        "\nCPU µs per stored result (each process's CPU seconds over the scenario / results "
        "stored; broker and Redis: the whole server over the scenario's window)",
        head,
        "-" * len(head),
    ]
    for run, s in scenarios:
        budget = _cpu_budget(s)
        cells = "".join(
            f"{budget[n]:>{w},.1f}" if n in budget else f"{'-':>{w}}"
            for n, w in zip(names, widths, strict=True)
        )
        lines.append(f"{_label(run):<{label_width}}{s['scenario']:<14}{cells}")
    return lines


def process_columns(budgets: list[dict[str, float]]) -> list[str]:
    """Every process named in ``budgets``: the pipelines' own in order of first appearance,
    then the broker, Redis and the load generator, then ``total``."""
    seen: dict[str, None] = {}
    for budget in budgets:
        seen.update(dict.fromkeys(budget))
    stages = [n for n in seen if _is_stage(n) and n != "total"]
    return [*stages, *(n for n in SERVICE_NAMES if n in seen), "total"]


def _label_width(report: dict[str, Any]) -> int:
    return max([26, *(len(_label(run)) + 2 for run in report["runs"])])


def _stage_names(scenario: dict[str, Any]) -> list[str]:
    return [n for n in scenario["processes"] if _is_stage(n)]


def _abbrev(names: list[str]) -> str:
    return "/".join(n[:3] for n in names)


def _stage_heading(report: dict[str, Any]) -> str:
    """``val/inf/per`` (the first scenario's processes; rows that differ name their own)."""
    first = next((s for run in report["runs"] for s in run["scenarios"]), None)
    return _abbrev(_stage_names(first) if first else list(STAGE_NAMES))


def _profile_lines(report: dict[str, Any], top: int = 6) -> list[str]:
    """Top self-time frames per stage, for runs made with ``--profile``."""
    lines: list[str] = []
    for run in report["runs"]:
        for s in run["scenarios"]:
            for stage, prof in s.get("profile", {}).items():
                lines.append(f"\nprofile {_label(run)} {stage} ({prof['samples']} samples, self):")
                lines += [f"  {pct:5.1f}%  {frame}" for frame, pct in prof["self"][:top]]
    return lines


def _label(run: dict[str, Any]) -> str:
    name = f"{run['pipeline']}[{run['variant']}]" if run.get("variant") else run["pipeline"]
    return f"{name} ({run['guarantee']})"


def plot(report: dict[str, Any], path: Path) -> None:
    """Latency CDF per pipeline (colour) and scenario (line style); closed-loop results/s
    over time in 1 s bins."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    styles = ["-", "--", ":", "-."]
    fig, (cdf_ax, time_ax, cpu_ax) = plt.subplots(
        1, 3, figsize=(16, 4.6), gridspec_kw={"width_ratios": [1.1, 1, 0.9]}
    )
    for n, run in enumerate(report["runs"]):
        colour = f"C{n % 10}"
        for k, s in enumerate(run["scenarios"]):
            if s["cdf_ms"]:
                q = np.linspace(0, 1, len(s["cdf_ms"]))
                label = f"{_label(run)} {s['scenario']}"
                cdf_ax.plot(s["cdf_ms"], q, styles[k % 4], color=colour, lw=1.1, label=label)
            if s["kind"] == "closed" and s["timeline"]:
                per_s = _rebin(s["timeline"], round(1 / TIMELINE_BIN_S))
                time_ax.plot(np.arange(len(per_s)), per_s, color=colour, label=_label(run))
    cdf_ax.set(xscale="log", xlabel="latency created_at -> stored (ms)", ylabel="fraction")
    cdf_ax.set_title("latency CDF (line style: scenario)")
    cdf_ax.grid(True, which="both", alpha=0.3)
    cdf_ax.legend(fontsize=5, ncol=2, loc="lower right")
    time_ax.set(xlabel="seconds", ylabel="results/s (1 s bins)")
    time_ax.set_title("closed loop: results/s over time")
    time_ax.grid(True, alpha=0.3)
    time_ax.legend(fontsize=7)
    plot_cpu_budget(cpu_ax, report)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def plot_cpu_budget(ax: Any, report: dict[str, Any]) -> None:
    """One stacked bar per pipeline: CPU µs per stored result in its closed loop, one segment
    per process (the same colour for a process name in every bar), the total on top."""
    bars = [
        (_label(run), _cpu_budget(s))
        for run in report["runs"]
        for s in run["scenarios"]
        if s["kind"] == "closed" and _cpu_budget(s)
    ]
    ax.set_title("closed loop: CPU µs per stored result")
    if not bars:
        return
    names = [n for n in process_columns([b for _, b in bars]) if n != "total"]
    x = np.arange(len(bars))
    bottom = np.zeros(len(bars))
    for k, name in enumerate(names):
        heights = np.array([budget.get(name, 0.0) for _, budget in bars])
        label = _HEADINGS.get(name, name)
        ax.bar(x, heights, bottom=bottom, color=f"C{k % 10}", label=label, width=0.6)
        bottom += heights
    for i, (_, budget) in enumerate(bars):
        ax.annotate(
            f"{budget['total']:,.0f}", (x[i], bottom[i]), ha="center", va="bottom", fontsize=7
        )
    ax.set_xticks(x, [label for label, _ in bars], rotation=20, ha="right", fontsize=6)
    ax.set(ylabel="CPU µs per stored result")
    ax.grid(True, axis="y", alpha=0.3)
    ax.legend(fontsize=6, loc="upper left", bbox_to_anchor=(1.0, 1.0))  # off the bars


def _rebin(rates: list[float], factor: int) -> list[float]:
    """Mean of every ``factor`` consecutive bins."""
    return [float(np.mean(rates[i : i + factor])) for i in range(0, len(rates), factor)]


def main(argv: list[str] | None = None) -> None:
    """``python -m bench.report REPORT.json``: print the table and redraw the PNG."""
    import sys

    json_path = Path((argv or sys.argv[1:])[0])
    report = json.loads(json_path.read_text())
    plot(report, json_path.with_suffix(".png"))
    print(table(report))


if __name__ == "__main__":
    main()

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
                "records_per_s": stored / seconds if name in STAGE_NAMES else None,
                "records_per_cpu_s": stored / u.cpu_s if name in STAGE_NAMES and u.cpu_s else None,
            }
            for name, u in usage.items()
        },
        "load_avg_1m_after": load[0],
    }


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
    """The human summary: one row per pipeline and scenario, then the ratios."""
    head = (
        f"{'pipeline':<26}{'scenario':<14}{'sent':>8}{'lost':>6}{'results/s':>11}"
        f"{'p50':>8}{'p95':>8}{'p99':>8}{'max':>8}  cpu% val/inf/per  rss MB val/inf/per"
    )
    lines = [head, "-" * len(head)]
    for run in report["runs"]:
        label = _label(run)
        if run.get("error"):
            lines.append(f"{label:<26}FAILED: {run['error'].splitlines()[0][:90]}")
        for s in run["scenarios"]:
            lat, procs = s["latency_ms"], s["processes"]
            cpu = "/".join(f"{procs[n]['cpu_pct']:.0f}" for n in STAGE_NAMES)
            rss = "/".join(f"{procs[n]['rss_max_mb']:.0f}" for n in STAGE_NAMES)
            lines.append(
                f"{label:<26}{s['scenario']:<14}{s['sent']:>8}{s['lost']:>6}"
                f"{s['results_per_s']:>11,.0f}{lat['p50']:>8.1f}{lat['p95']:>8.1f}"
                f"{lat['p99']:>8.1f}{lat['max']:>8.1f}  {cpu:<17}{rss}"
            )
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
    fig, (cdf_ax, time_ax) = plt.subplots(1, 2, figsize=(11, 4.2))
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
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


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

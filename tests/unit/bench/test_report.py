"""The benchmark report's CPU budget: µs of CPU per stored result for every process sampled
(any set of pipeline processes: split, fused, peers), in the JSON, the table and the PNG."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from bench.driver import Measurement
from bench.options import ScenarioSpec
from bench.pipelines import Usage
from bench.report import cpu_us_per_result, plot, process_columns, summarise, table


def test_cpu_per_result_divides_each_process_and_sums_the_total() -> None:
    budget = cpu_us_per_result({"validate": 0.3, "kafka": 0.18, "driver": 0.14}, stored=10_000)
    assert budget == {"validate": 30.0, "kafka": 18.0, "driver": 14.0, "total": 62.0}


def test_cpu_per_result_is_empty_when_nothing_was_stored() -> None:
    assert cpu_us_per_result({"validate": 1.0}, stored=0) == {}


def _measurement(stored: int) -> Measurement:
    m = Measurement(spec=ScenarioSpec(name="closed", count=stored), started=100.0)
    m.sent, m.send_done = stored, 101.0
    m.created = [100.0 + i * 1e-4 for i in range(stored)]
    m.stored = [c + 0.05 for c in m.created]
    m.ids = [str(i) for i in range(stored)]
    return m


def test_summary_holds_the_budget_of_whatever_processes_were_sampled() -> None:
    usage = {
        "fused": Usage(cpu_s=0.5, rss_max_mb=120),
        "persist": Usage(cpu_s=0.25, rss_max_mb=100),
        "kafka": Usage(cpu_s=0.1, rss_max_mb=600),
        "redis": Usage(cpu_s=0.05, rss_max_mb=10),
        "driver": Usage(cpu_s=0.1, rss_max_mb=200),
    }
    summary = summarise(_measurement(5000), usage, load=(1.0, 1.0, 1.0))
    assert summary["cpu_us_per_result"] == {
        "fused": 100.0,
        "persist": 50.0,
        "kafka": 20.0,
        "redis": 10.0,
        "driver": 20.0,
        "total": 200.0,
    }
    assert summary["processes"]["fused"]["records_per_cpu_s"] == 10_000
    assert summary["processes"]["kafka"]["records_per_cpu_s"] is None
    json.dumps(summary)  # JSON-ready


def test_columns_put_pipeline_processes_first_then_services_then_total() -> None:
    budgets = [
        {"driver": 1.0, "kafka": 1.0, "validate": 1.0, "infer": 1.0, "total": 4.0},
        {"redis": 1.0, "fused": 1.0, "persist": 1.0, "total": 3.0},
    ]
    assert process_columns(budgets) == [
        "validate",
        "infer",
        "fused",
        "persist",
        "kafka",
        "redis",
        "driver",
        "total",
    ]


def _scenario(name: str, kind: str, cpu_s: dict[str, float], stored: int) -> dict[str, Any]:
    processes = {n: {"cpu_s": c, "cpu_pct": 10.0, "rss_max_mb": 100.0} for n, c in cpu_s.items()}
    return {
        "scenario": name,
        "kind": kind,
        "rate": None if kind == "closed" else 500.0,
        "sent": stored,
        "stored": stored,
        "lost": 0,
        "results_per_s": 1000.0,
        "latency_ms": {"p50": 1.0, "p95": 2.0, "p99": 3.0, "max": 4.0},
        "processes": processes,
        "cdf_ms": [1.0, 2.0, 3.0],
        "timeline": [1000.0] * 8,
        "cpu_us_per_result": cpu_us_per_result(cpu_s, stored),
    }


def _report() -> dict[str, Any]:
    split = {"validate": 0.3, "infer": 0.35, "persist": 0.53, "kafka": 0.18, "redis": 0.04}
    fused = {"fused": 0.5, "persist": 0.4, "kafka": 0.1, "redis": 0.04, "driver": 0.14}
    return {
        "machine": {"cpu": "test", "cores": 2, "load_avg_before": [1], "load_avg_after": [2]},
        "runs": [
            {
                "pipeline": "ours",
                "variant": "",
                "guarantee": "exactly-once",
                "scenarios": [
                    _scenario("open 500/s", "open", split, 5_000),
                    _scenario("closed", "closed", {**split, "driver": 0.14}, 10_000),
                ],
            },
            {
                "pipeline": "ours",
                "variant": "fused",
                "guarantee": "exactly-once",
                "scenarios": [_scenario("closed", "closed", fused, 10_000)],
            },
        ],
    }


def _cpu_rows(text: str) -> dict[tuple[str, str], list[str]]:
    """The CPU budget table's rows by (pipeline, scenario) -> the cells after them."""
    block = text.split("CPU µs per stored result", 1)[1].splitlines()[1:]
    rows = {}
    for line in block[2:]:
        if not line.strip():
            break
        label, _, rest = line.partition(") ")
        words = rest.split()
        n = 2 if words[0] == "open" else 1  # "open 500/s" or "closed"
        rows[(label + ")", " ".join(words[:n]))] = words[n:]
    return rows


def test_table_has_one_column_per_process_and_dashes_where_a_pipeline_has_none() -> None:
    text = table(_report())
    header = text.split("CPU µs per stored result", 1)[1].splitlines()[1]
    assert header.split()[2:] == [
        "validate",
        "infer",
        "persist",
        "fused",
        "broker",
        "redis",
        "loadgen",
        "total",
    ]
    rows = _cpu_rows(text)
    assert rows[("ours (exactly-once)", "closed")] == [
        "30.0", "35.0", "53.0", "-", "18.0", "4.0", "14.0", "154.0",
    ]  # fmt: skip
    assert rows[("ours (exactly-once)", "open 500/s")][-2:] == ["-", "280.0"]  # no driver
    assert rows[("ours[fused] (exactly-once)", "closed")] == [
        "-", "-", "40.0", "50.0", "10.0", "4.0", "14.0", "118.0",
    ]  # fmt: skip


def test_table_names_the_stages_of_a_row_whose_processes_differ() -> None:
    lines = table(_report()).splitlines()
    assert "cpu% val/inf/per" in lines[0]
    fused_row = next(line for line in lines if line.startswith("ours[fused]"))
    assert "fus/per 10/10" in fused_row


def test_a_report_written_before_the_budget_existed_gets_it_recomputed() -> None:
    report = _report()
    for run in report["runs"]:
        for scenario in run["scenarios"]:
            del scenario["cpu_us_per_result"]
    assert _cpu_rows(table(report))[("ours (exactly-once)", "closed")][-1] == "154.0"


def test_plot_draws_the_budget_bars(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    path = tmp_path / "bench.png"
    plot(_report(), path)
    assert path.stat().st_size > 10_000

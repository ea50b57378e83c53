"""``streaminfer bench --quick`` end to end, so the benchmark cannot rot. No timing asserted:
only that every request came back and the report holds what bench/README.md promises."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import REPO

pytestmark = pytest.mark.integration


def test_quick_bench_gets_every_result_back_and_reports_it(services: None, tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "streaminfer.cli", "bench", "--quick", "--out", str(tmp_path)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    [report_file] = tmp_path.glob("bench-*.json")
    report = json.loads(report_file.read_text())
    assert (tmp_path / report_file.name.replace(".json", ".png")).stat().st_size > 0
    assert report["machine"]["cores"] >= 1
    [run] = report["runs"]
    assert (run["pipeline"], run["guarantee"]) == ("ours", "exactly-once")
    assert [s["kind"] for s in run["scenarios"]] == ["open", "open", "closed"]
    for scenario in run["scenarios"]:
        assert scenario["sent"] > 0
        assert scenario["stored"] == scenario["sent"], scenario["scenario"]
        assert scenario["results_per_s"] > 0
        latency = scenario["latency_ms"]
        assert 0 < latency["p50"] <= latency["p95"] <= latency["p99"] <= latency["max"]
        assert set(scenario["hops_median_ms"]) == {"to validated", "to inferred", "to stored"}
        for stage in ("validate", "infer", "persist"):
            usage = scenario["processes"][stage]
            assert usage["cpu_s"] > 0 and usage["rss_max_mb"] > 0, stage
        budget = scenario["cpu_us_per_result"]  # µs of CPU per stored result, per process
        assert set(scenario["processes"]) | {"total"} == set(budget)
        assert budget["total"] == pytest.approx(sum(budget.values()) - budget["total"], abs=1)
        assert budget["total"] > 0
    assert "results/s" in done.stdout and "p99" in done.stdout
    assert "CPU µs per stored result" in done.stdout

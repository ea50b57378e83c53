"""ops/prometheus and ops/grafana: promtool checks the configs and rules and runs the alert
unit tests (ops/prometheus/alerts_test.yml); the dashboard and the rules only name metrics
that stages/metrics.py defines."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from stages.metrics import METRICS, markdown_table
from streaminfer.monitoring import (
    JOB_INGEST,
    JOB_MONITOR,
    JOB_STAGE,
    JOB_SUPERVISOR,
    TargetFiles,
    prometheus_config,
)
from tests.helpers import REPO

PROMETHEUS_DIR = REPO / "ops" / "prometheus"
ALERTS = PROMETHEUS_DIR / "alerts.yml"
ALERT_TESTS = PROMETHEUS_DIR / "alerts_test.yml"
DASHBOARD = REPO / "ops" / "grafana" / "streaminfer.json"
PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(
    PROMTOOL is None, reason="promtool missing: apt-get install prometheus (Debian's package)"
)


def promtool(*args: str, cwd: Path = PROMETHEUS_DIR) -> str:
    assert PROMTOOL is not None
    result = subprocess.run([PROMTOOL, *args], cwd=cwd, capture_output=True, text=True, timeout=120)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    return output


@needs_promtool
def test_the_alert_rules_are_valid() -> None:
    assert "SUCCESS: 6 rules found" in promtool("check", "rules", str(ALERTS))


@needs_promtool
def test_every_alert_unit_test_passes() -> None:
    assert "SUCCESS" in promtool("test", "rules", str(ALERT_TESTS))


@needs_promtool
def test_the_compose_prometheus_config_is_valid() -> None:
    promtool("check", "config", str(PROMETHEUS_DIR / "prometheus.yml"))


@needs_promtool
def test_the_generated_local_config_is_valid(tmp_path: Path) -> None:
    targets = TargetFiles(tmp_path / "targets")
    targets.write_stage("infer", base_port=9500, workers=2, host="127.0.0.1")
    config = tmp_path / "prometheus.yml"
    config.write_text(prometheus_config(targets_dir=targets.directory, scrape_interval_s=1))
    output = promtool("check", "config", str(config))
    assert "SUCCESS: 2 rule files found" in output


def _alerts() -> list[str]:
    groups = yaml.safe_load(ALERTS.read_text())["groups"]
    return [rule["alert"] for group in groups for rule in group["rules"]]


def test_every_alert_is_tested_firing_and_quiet() -> None:
    fires: set[str] = set()
    quiet: set[str] = set()
    for test in yaml.safe_load(ALERT_TESTS.read_text())["tests"]:
        for check in test["alert_rule_test"]:
            (fires if check["exp_alerts"] else quiet).add(check["alertname"])
    alerts = set(_alerts())
    assert alerts == {
        "StageNoLiveWorker",
        "ConsumerLagGrowing",
        "DlqRateHigh",
        "EndToEndP99AboveSlo",
        "TransactionalWatchdogExit",
        "RedisUnavailable",
    }
    assert alerts - fires == set(), "alerts never tested firing"
    assert alerts - quiet == set(), "alerts never tested quiet"


def dashboard_queries() -> list[tuple[str, str]]:
    """(panel title, PromQL) of every query of the dashboard."""
    dashboard = json.loads(DASHBOARD.read_text())
    return [
        (panel["title"], target["expr"])
        for panel in dashboard["panels"]
        for target in panel.get("targets", [])
    ]


_SUFFIXES = ("_total", "_bucket", "_sum", "_count")


def _metric_names(expr: str) -> set[str]:
    names = set()
    for name in re.findall(r"\bstreaminfer_[a-z_]+", expr):
        for suffix in _SUFFIXES:
            name = name.removesuffix(suffix)
        names.add(name)
    return names


def test_dashboard_and_rules_name_only_defined_metrics() -> None:
    defined = {m.name for m in METRICS}
    used = set().union(*(_metric_names(expr) for _, expr in dashboard_queries()))
    used |= _metric_names(ALERTS.read_text())
    assert used - defined == set()


def test_the_dashboard_covers_what_operators_ask() -> None:
    queries = " ".join(expr for _, expr in dashboard_queries())
    for metric in (
        "streaminfer_records_consumed_total",  # throughput per stage
        "streaminfer_consumer_lag_records",  # lag per group
        "streaminfer_end_to_end_latency_seconds_bucket",  # end-to-end p50/p99
        "streaminfer_batch_size_records_bucket",  # batch sizes
        "streaminfer_dlq_records_total",  # DLQ by reason
        "streaminfer_model_requests_total",  # model-version shares
        "streaminfer_transaction_commit_seconds_bucket",  # transaction commit latency
    ):
        assert metric in queries
    dashboard: dict[str, Any] = json.loads(DASHBOARD.read_text())
    for panel in dashboard["panels"]:
        if panel["type"] != "row":
            assert panel["datasource"]["uid"] == "prometheus", panel["title"]


def test_compose_provisions_prometheus_and_grafana_with_the_dashboard() -> None:
    services = yaml.safe_load((REPO / "docker-compose.yml").read_text())["services"]
    assert "./ops/prometheus:/etc/prometheus:ro" in services["prometheus"]["volumes"]
    volumes = " ".join(services["grafana"]["volumes"])
    assert "./ops/grafana/streaminfer.json:" in volumes
    assert "./ops/grafana/provisioning:/etc/grafana/provisioning" in volumes
    datasource = REPO / "ops" / "grafana" / "provisioning" / "datasources" / "prometheus.yml"
    assert yaml.safe_load(datasource.read_text())["datasources"][0]["uid"] == "prometheus"


def test_target_files_list_each_worker_and_the_supervisor(tmp_path: Path) -> None:
    targets = TargetFiles(tmp_path)
    targets.write_stage("infer", base_port=9500, workers=2, host="127.0.0.1")
    workers = json.loads(targets.path(JOB_STAGE, "infer").read_text())
    assert workers == [
        {"targets": ["127.0.0.1:9500"], "labels": {"stage": "infer", "worker": "0"}},
        {"targets": ["127.0.0.1:9501"], "labels": {"stage": "infer", "worker": "1"}},
    ]
    supervisor = json.loads(targets.path(JOB_SUPERVISOR, "infer").read_text())
    assert supervisor[0]["targets"] == ["127.0.0.1:9599"]
    targets.remove_stage("infer")
    assert list(tmp_path.iterdir()) == []


def test_the_generated_config_scrapes_every_job_from_the_target_files(tmp_path: Path) -> None:
    config = yaml.safe_load(prometheus_config(targets_dir=tmp_path, scrape_interval_s=1))
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    assert set(jobs) == {JOB_STAGE, JOB_SUPERVISOR, JOB_INGEST, JOB_MONITOR}
    assert jobs[JOB_STAGE]["file_sd_configs"][0]["files"] == [str(tmp_path / f"{JOB_STAGE}-*.json")]
    assert config["global"]["scrape_interval"] == "1000ms"
    assert config["rule_files"] == [str(ALERTS), str(PROMETHEUS_DIR / "monitor-rules.yml")]


def test_the_metrics_table_lists_every_metric_once() -> None:
    table = markdown_table()
    assert table in (REPO / "README.md").read_text(), "README's metrics table is stale"
    assert len(table.splitlines()) == 2 + len(METRICS)
    assert len({m.name for m in METRICS}) == len(METRICS)
    # streaminfer_<thing>_<unit> (a counter's unit is its _total)
    assert all(re.fullmatch(r"streaminfer(_[a-z]+)+", m.name) for m in METRICS)
    assert all(re.fullmatch(r"streaminfer_[a-z_]+_[a-z]+", m.exposed) for m in METRICS)

"""How the monitor is installed and started, and its alert rule (promtool).

The monitor has a virtualenv of its own (faust-streaming pins click<8.4, the product locks
click 8.5): these tests keep the pieces that run in the product's venv free of faust, keep
the shared packages at the product's versions, and check what `streaminfer monitor` passes.
"""

from __future__ import annotations

import ast
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from monitor.__main__ import build_parser
from monitor.gauges import NAMES
from streaminfer.cli import _monitor_settings
from streaminfer.settings import Settings
from tests.helpers import REPO

MONITOR = REPO / "monitor"
PROMETHEUS = REPO / "ops" / "prometheus"
RULES = PROMETHEUS / "monitor-rules.yml"
RULE_TESTS = PROMETHEUS / "monitor-rules_test.yml"
PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(
    PROMTOOL is None, reason="promtool missing: apt-get install prometheus (Debian's package)"
)
_PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;\\]+)", re.MULTILINE)


def pins(lock: Path) -> dict[str, str]:
    return {name.lower(): version for name, version in _PIN.findall(lock.read_text())}


def imports(path: Path) -> set[str]:
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module.split(".")[0])
    return found


def test_only_the_app_module_imports_faust() -> None:
    importing = {p.name for p in MONITOR.glob("*.py") if {"faust", "mode"} & imports(p)}
    assert importing == {"app.py"}


def test_the_monitor_lock_pins_the_shared_packages_at_the_product_versions() -> None:
    monitor, product = pins(MONITOR / "requirements.lock"), pins(REPO / "requirements.lock")
    for name in ("msgspec", "numpy", "pyyaml", "prometheus-client"):
        assert monitor[name] == product[name], f"{name}: re-lock monitor/ (make monitor-lock)"
    assert monitor["faust-streaming"].startswith("0.15.")
    assert "cramjam" in monitor  # aiokafka cannot read lz4 batches without it
    entries = re.split(r"\n(?=[A-Za-z0-9])", (MONITOR / "requirements.lock").read_text())
    assert all("--hash=sha256:" in e for e in entries if _PIN.match(e))


def test_streaminfer_monitor_passes_the_settings_the_monitor_needs(tmp_path: Path) -> None:
    settings = Settings().with_changes(kafka={"topic_prefix": "t.", "bootstrap_servers": "a:1,b:2"})
    args = build_parser().parse_args([*_monitor_settings(settings), "--windows", "5s,1m"])
    assert args.bootstrap_servers == "a:1,b:2" and args.topic_prefix == "t."
    assert args.models_dir == settings.stage.models_dir.resolve()
    assert args.windows == (5, 60) and args.port == 9390


def test_the_rules_name_only_the_monitors_gauges() -> None:
    used = set(re.findall(r"\bstreaminfer_[a-z_]+", RULES.read_text()))
    assert used and used <= set(NAMES.values())


def test_the_drift_alert_is_tested_firing_and_quiet() -> None:
    tests = yaml.safe_load(RULE_TESTS.read_text())["tests"]
    checks = [check for test in tests for check in test["alert_rule_test"]]
    assert {c["alertname"] for c in checks if c["exp_alerts"]} == {"ModelLabelDrift"}
    assert {c["alertname"] for c in checks if not c["exp_alerts"]} == {"ModelLabelDrift"}


def promtool(*args: str) -> str:
    assert PROMTOOL is not None
    done = subprocess.run(
        [PROMTOOL, *args], cwd=PROMETHEUS, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout + done.stderr


@needs_promtool
def test_the_rules_are_valid() -> None:
    assert "SUCCESS: 1 rules found" in promtool("check", "rules", str(RULES))


@needs_promtool
def test_the_rule_unit_tests_pass() -> None:
    assert "SUCCESS" in promtool("test", "rules", str(RULE_TESTS))

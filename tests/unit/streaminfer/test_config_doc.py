"""The README's configuration tables are ``streaminfer config --doc``, and they are complete."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from streaminfer.config_doc import BEGIN, END, OPS_VARIABLES, table, variables
from streaminfer.settings import GROUPS, Settings

REPO = Path(__file__).resolve().parents[3]
PRODUCT = ["schemas", "kafkaio", "stages", "sinks", "ingest", "backfill", "streaminfer"]
# What the ops scripts and compose read: our own prefix and the two documented short names.
_VARIABLE = re.compile(r"\b(STREAMINFER_[A-Z0-9_]*[A-Z0-9]|KAFKA_BOOTSTRAP_SERVERS|REDIS_URL)\b")


def _setting_variables() -> set[str]:
    names: set[str] = set()
    for group in [Settings, *GROUPS.values()]:
        for name, field in group.model_fields.items():
            names.update(variables(group, name, field))
    return names


def _ops_files() -> list[Path]:
    files = [*REPO.glob("ops/**/*.sh"), *REPO.glob("ops/**/*.yaml"), *REPO.glob("ops/**/*.yml")]
    return [*files, REPO / "docker-compose.yml", REPO / "Dockerfile", REPO / "Makefile"]


def test_the_readme_holds_exactly_the_generated_table() -> None:
    readme = (REPO / "README.md").read_text()
    assert readme.count(BEGIN) == 1 and readme.count(END) == 1
    start = readme.index(BEGIN)
    in_readme = readme[start : readme.index(END, start) + len(END)]
    assert in_readme == table(), "paste the output of `streaminfer config --doc` into README.md"


def test_every_setting_is_described() -> None:
    rows = [line for line in table().splitlines() if line.startswith("| `")]
    assert rows and all(not line.endswith("|  |") for line in rows)


def test_every_variable_the_ops_files_read_is_a_setting_or_listed() -> None:
    used = {m for path in _ops_files() for m in _VARIABLE.findall(path.read_text())}
    unknown = used - _setting_variables() - set(OPS_VARIABLES)
    assert not unknown, f"add to Settings or to config_doc.OPS_VARIABLES: {sorted(unknown)}"


def test_every_listed_ops_variable_is_still_used() -> None:
    used = {m for path in _ops_files() for m in _VARIABLE.findall(path.read_text())}
    assert set(OPS_VARIABLES) <= used


def test_ops_variables_are_not_settings_too() -> None:
    assert not set(OPS_VARIABLES) & _setting_variables()


@pytest.mark.parametrize("package", PRODUCT)
def test_the_product_reads_the_environment_only_through_settings(package: str) -> None:
    reads = re.compile(r"os\.getenv\(|environ\.get\(|environ\[|getenv\(")
    offenders = [
        f"{path.relative_to(REPO)}:{number}"
        for path in sorted((REPO / package).rglob("*.py"))
        for number, line in enumerate(path.read_text().splitlines(), 1)
        if reads.search(line)
    ]
    assert not offenders, f"read it as a Settings field instead: {offenders}"

"""The lock files agree with pyproject.toml, with each other and with what the tests run on.

``make lock`` rewrites them after a change to pyproject.toml's dependencies; these tests say
when that was forgotten.
"""

from __future__ import annotations

import re
import tomllib
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

REPO = Path(__file__).resolve().parents[3]
PRODUCT_LOCK = REPO / "requirements.lock"
DEV_LOCK = REPO / "requirements-dev.lock"
_PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;\\]+)", re.MULTILINE)


def _pins(lock: Path) -> dict[str, str]:
    return {canonicalize_name(name): pinned for name, pinned in _PIN.findall(lock.read_text())}


def _requirements(extra: str | None = None) -> list[Requirement]:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    listed = project["optional-dependencies"][extra] if extra else project["dependencies"]
    requirements = [Requirement(text) for text in listed]
    # `streaminfer[tracing]` in the dev extra is this project's own extra: expand it
    own = [r for r in requirements if r.name == project["name"]]
    expanded = [x for r in own for extra_name in r.extras for x in _requirements(extra_name)]
    return [r for r in requirements if r.name != project["name"]] + expanded


@pytest.mark.parametrize(
    ("lock", "requirements"),
    [
        (PRODUCT_LOCK, _requirements()),
        (DEV_LOCK, _requirements() + _requirements("dev")),
    ],
    ids=["product", "dev"],
)
def test_every_direct_dependency_is_pinned_within_its_range(
    lock: Path, requirements: list[Requirement]
) -> None:
    pins = _pins(lock)
    for requirement in requirements:
        pinned = pins.get(canonicalize_name(requirement.name))
        assert pinned is not None, f"{requirement.name} is not in {lock.name}: run `make lock`"
        assert requirement.specifier.contains(pinned), (
            f"{requirement} but {lock.name} pins {pinned}"
        )


@pytest.mark.parametrize("lock", [PRODUCT_LOCK, DEV_LOCK], ids=["product", "dev"])
def test_every_pin_carries_hashes(lock: Path) -> None:
    # pip --require-hashes refuses the whole file otherwise; checked here to fail early.
    entries = re.split(r"\n(?=[A-Za-z0-9])", lock.read_text())
    pinned = [entry for entry in entries if _PIN.match(entry)]
    assert pinned and all("--hash=sha256:" in entry for entry in pinned)


def test_the_product_lock_is_the_dev_lock_without_the_dev_tools() -> None:
    product, dev = _pins(PRODUCT_LOCK), _pins(DEV_LOCK)
    assert {name: dev.get(name) for name in product} == product
    assert not {"pytest", "mypy", "ruff", "hypothesis"} & set(product)


def test_the_tests_run_on_the_locked_versions() -> None:
    wrong = {}
    for name, pinned in _pins(DEV_LOCK).items():
        try:
            installed = version(name)
        except PackageNotFoundError:
            installed = "missing"
        if installed != pinned:
            wrong[name] = f"{installed} installed, {pinned} locked"
    assert not wrong, f"reinstall from the lock (make setup): {wrong}"

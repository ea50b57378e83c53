"""The installed product works without the checkout: what the Docker image runs.

The wheel is built from a copy of the checkout (so the build leaves nothing in the work tree)
and installed with ``--no-deps`` into a fresh virtualenv outside it. That virtualenv reaches
the dependencies through a ``.pth`` line naming this interpreter's site-packages: the same
locked versions the image installs, without downloading them again. A ``.pth`` line adds a
directory to ``sys.path`` but runs none of the ``.pth`` files inside it, so the editable
install of the checkout stays invisible there.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[3]
OUTSIDE_THE_PRODUCT = {"bench", "monitor", "tests"}  # monitor: its own venv (faust)
# Build output and state that a copy of the checkout does not need.
_NOT_COPIED = shutil.ignore_patterns(
    ".git",
    ".venv",
    ".cache",
    ".run",
    "build",
    "dist",
    "*.egg-info",
    "__pycache__",
    ".*_cache",
    ".hypothesis",
    "results",
)


@dataclass(frozen=True)
class Installed:
    wheel: Path
    python: Path
    bin: Path
    cwd: Path  # outside the checkout


def _run(argv: list[str], cwd: Path, timeout: float = 180) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    return subprocess.run(
        argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout, check=False
    )


def _ok(result: subprocess.CompletedProcess[str]) -> subprocess.CompletedProcess[str]:
    assert result.returncode == 0, f"{result.args} -> {result.returncode}\n{result.stderr[-3000:]}"
    return result


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Installed]:
    root = tmp_path_factory.mktemp("wheel")
    assert not root.resolve().is_relative_to(REPO)
    source = root / "src"
    shutil.copytree(REPO, source, ignore=_NOT_COPIED, symlinks=True)
    pip = [sys.executable, "-m", "pip", "-q"]
    # The build backend is pinned in the dev lock: no build isolation, nothing fetched.
    build = ["wheel", "--no-deps", "--no-build-isolation", "-w", str(root / "dist"), str(source)]
    _ok(_run([*pip, *build], cwd=root))
    (wheel,) = (root / "dist").glob("streaminfer-*.whl")
    venv = root / "venv"
    _ok(_run([sys.executable, "-m", "venv", "--without-pip", str(venv)], cwd=root))
    python = venv / "bin" / "python"
    where = "import sysconfig; print(sysconfig.get_path('purelib'))"
    purelib = Path(_ok(_run([str(python), "-c", where], cwd=root)).stdout.strip())
    (purelib / "_locked_dependencies.pth").write_text(sysconfig.get_path("purelib") + "\n")
    _ok(_run([*pip, "--python", str(python), "install", "--no-deps", str(wheel)], cwd=root))
    yield Installed(wheel=wheel, python=python, bin=venv / "bin", cwd=root)


def _product_packages() -> set[str]:
    """Top-level packages of the checkout that belong to the product."""
    found = {p.parent.name for p in REPO.glob("*/__init__.py")}
    return found - OUTSIDE_THE_PRODUCT


def test_the_wheel_holds_the_product_and_nothing_else(installed: Installed) -> None:
    names = zipfile.ZipFile(installed.wheel).namelist()
    top_level = {n.split("/")[0] for n in names if "/" in n and ".dist-info/" not in n}
    assert top_level == _product_packages()
    schemas = {p.name for p in (REPO / "schemas" / "jsonschema").glob("*.json")}
    assert {f"schemas/jsonschema/{name}" for name in schemas} <= set(names)


_IMPORT_EVERY_MODULE = """
import importlib, json, pkgutil, sys
packages = json.loads(sys.argv[1])
for name in packages:
    package = importlib.import_module(name)
    for info in pkgutil.walk_packages(package.__path__, name + "."):
        importlib.import_module(info.name)
files = {m: getattr(sys.modules[m], "__file__", None) for m in packages}
outside = sorted(m for m in ("bench", "tests") if m in sys.modules)
print(json.dumps({"files": files, "outside": outside}))
"""


def test_every_product_module_imports_from_the_install_alone(installed: Installed) -> None:
    packages = sorted(_product_packages())
    result = _ok(
        _run(
            [str(installed.python), "-c", _IMPORT_EVERY_MODULE, json.dumps(packages)],
            cwd=installed.cwd,
        )
    )
    report = json.loads(result.stdout.splitlines()[-1])
    assert report["outside"] == [], "the product imported bench/ or tests/"
    venv = installed.python.parent.parent
    for module, file in report["files"].items():
        assert Path(file).is_relative_to(venv), f"{module} was imported from {file}"


def _entrypoint() -> list[str]:
    for line in (REPO / "Dockerfile").read_text().splitlines():
        if line.startswith("ENTRYPOINT"):
            entrypoint: list[str] = json.loads(line.removeprefix("ENTRYPOINT"))
            return entrypoint
    raise AssertionError("the Dockerfile has no ENTRYPOINT")


def _containers(node: object) -> Iterator[dict[str, object]]:
    """Every Kubernetes container spec anywhere in a manifest."""
    if isinstance(node, dict):
        containers = node.get("containers")
        if isinstance(containers, list):
            yield from (c for c in containers if isinstance(c, dict))
        for value in node.values():
            yield from _containers(value)
    elif isinstance(node, list):
        for item in node:
            yield from _containers(item)


def _strings(value: object) -> list[str]:
    return [str(v) for v in value] if isinstance(value, list) else []


def _image_commands() -> list[list[str]]:
    """argv of every container that runs our image: docker-compose.yml and ops/k8s/."""
    entrypoint = _entrypoint()
    compose = yaml.safe_load((REPO / "docker-compose.yml").read_text())["services"]
    commands = [
        entrypoint + _strings(service["command"])
        for service in compose.values()
        if str(service.get("image", "")).startswith("streaminfer") and "command" in service
    ]
    for manifest in sorted((REPO / "ops" / "k8s").rglob("*.yaml")):
        for document in yaml.safe_load_all(manifest.read_text()):
            for container in _containers(document):
                if str(container.get("image", "")).startswith("streaminfer"):
                    command = _strings(container.get("command")) or entrypoint
                    commands.append(command + _strings(container.get("args")))
    return [list(argv) for argv in dict.fromkeys(map(tuple, commands))]  # each command once


def test_compose_runs_commands_of_our_image() -> None:
    commands = _image_commands()
    assert ["streaminfer", "stage", "infer"] in commands
    assert len(commands) >= 5


@pytest.mark.parametrize("argv", _image_commands(), ids=lambda argv: " ".join(argv))
def test_every_command_the_deployments_run_starts_from_the_install(
    installed: Installed, argv: list[str]
) -> None:
    program = installed.bin / argv[0]
    result = _ok(_run([str(program), *argv[1:], "--help"], cwd=installed.cwd))
    assert result.stdout.startswith("usage: streaminfer")


def test_bench_outside_a_checkout_says_where_it_lives(installed: Installed) -> None:
    result = _run([str(installed.bin / "streaminfer"), "bench", "--quick"], cwd=installed.cwd)
    assert result.returncode == 2
    assert "python -m bench" in result.stderr

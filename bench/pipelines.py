"""The pipelines under test, each as three stage processes (validate, infer, persist), and
the sampler that reads their CPU time and RSS.

* ``ours``: ``streaminfer stage NAME`` (one worker each), guarantee from the environment;
  the topology too (``STREAMINFER_STAGE_TOPOLOGY``, e.g. ``--variant
  fused:STREAMINFER_STAGE_TOPOLOGY=fused``): in the fused one, a single process ``fused``,
  or ``BENCH_FUSED_PROCESSES=N`` members of its group (``fused``, ``fused-2``, ...; one
  Python process uses one core, the three split stages use more).
* ``faust`` / ``quix``: the same chain written with faust-streaming / Quix Streams
  (``bench/peers/``), run with the peers' own virtualenv (``bench/peers/setup.sh``).

Every pipeline gets its own topic prefix, so no run sees another's records.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path

import psutil

from streaminfer.settings import REPO_ROOT, Settings

STAGES = ("validate", "infer", "persist")
FUSED = ("fused",)  # ours, in the fused topology
PEERS_DIR = REPO_ROOT / "bench" / "peers"
PEERS_PYTHON = REPO_ROOT / ".cache" / "peers-venv" / "bin" / "python"


@dataclass(frozen=True, slots=True)
class PipelineSpec:
    """Which implementation, with which guarantee, under which topic prefix."""

    name: str  # ours | faust | quix
    guarantee: str  # exactly-once | at-least-once
    prefix: str
    variant: str = ""  # ours with settings overridden through the environment (tuning)
    env: tuple[tuple[str, str], ...] = ()

    @property
    def label(self) -> str:
        name = f"{self.name}[{self.variant}]" if self.variant else self.name
        return f"{name} ({self.guarantee})"


def pipeline_stages(spec: PipelineSpec, env: dict[str, str]) -> tuple[str, ...]:
    """The stage processes of ``spec`` run with ``env`` (its topology, for ours), by name:
    ``<stage>`` or ``<stage>-<member>`` for a further member of the stage's group."""
    if spec.name == "ours" and env.get("STREAMINFER_STAGE_TOPOLOGY", "").strip() == "fused":
        members = int(env.get("BENCH_FUSED_PROCESSES", "1"))
        return (*FUSED, *(f"{FUSED[0]}-{k}" for k in range(2, members + 1)))
    return STAGES


def stage_command(spec: PipelineSpec, settings: Settings, stage: str) -> list[str]:
    """The command line of one stage process of ``spec``."""
    if spec.name == "ours":
        return [sys.executable, "-m", "streaminfer.cli", "stage", stage]
    if not PEERS_PYTHON.exists():
        raise FileNotFoundError(f"{PEERS_PYTHON} missing: run `bash bench/peers/setup.sh` first")
    return [
        str(PEERS_PYTHON),
        str(PEERS_DIR / f"{spec.name}_chain.py"),
        "--stage",
        stage,
        "--bootstrap",
        settings.kafka.bootstrap_servers,
        "--prefix",
        spec.prefix,
        "--redis-url",
        settings.redis.url.get_secret_value(),
        "--model",
        str(settings.stage.models_dir / "digits" / "1" / "model.onnx"),
        "--guarantee",
        spec.guarantee,
        "--batch-size",
        str(settings.stage.batch_max_records),
        "--batch-timeout",
        str(settings.stage.batch_timeout_s),
    ]


@dataclass
class StageProcesses:
    """The stage processes of one pipeline (three, or ours fused: one); logs in
    ``log_dir``."""

    spec: PipelineSpec
    settings: Settings
    log_dir: Path
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    def start(self) -> None:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        env = {
            **os.environ,
            "STREAMINFER_TOPIC_PREFIX": self.spec.prefix,
            "STREAMINFER_PROCESSING_GUARANTEE": self.spec.guarantee,
            "STREAMINFER_RUN_DIR": str(self.log_dir),
            "PYTHONPATH": str(REPO_ROOT),  # the peers import the message Structs (schemas/)
            **dict(self.spec.env),
        }
        # CWD=<checkout> runs another checkout's stages (e.g. a worktree of the commit before
        # a change): with ``python -m`` the working directory comes first on sys.path.
        # The peers write local state (faust's data dir, Quix's state dir) under their
        # working directory: keep it in the scratch directory, out of the checkout.
        default_cwd = REPO_ROOT if self.spec.name == "ours" else self.log_dir
        cwd = env.pop("CWD", str(default_cwd))
        for name in pipeline_stages(self.spec, env):
            stage, _, member = name.partition("-")
            log = (self.log_dir / f"{self.spec.name}-{name}.log").open("ab")
            self.procs[name] = subprocess.Popen(
                stage_command(self.spec, self.settings, stage),
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                cwd=cwd,
                # Members side by side need transactional.ids of their own.
                env={**env, "STREAMINFER_WORKER_ID": member} if member else env,
            )

    def pids(self) -> dict[str, int]:
        return {stage: proc.pid for stage, proc in self.procs.items()}

    def check_alive(self) -> None:
        for stage, proc in self.procs.items():
            if proc.poll() is not None:
                log = self.log_dir / f"{self.spec.name}-{stage}.log"
                tail = log.read_text(errors="replace")[-2000:]
                raise RuntimeError(f"{self.spec.label} {stage} exited {proc.returncode}:\n{tail}")

    def stop(self) -> None:
        """SIGTERM (drain and leave the group), SIGKILL after 30 s."""
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.procs.values():
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)


@dataclass
class Usage:
    """CPU seconds and peak RSS of one process over a measured interval."""

    cpu_s: float = 0.0
    rss_max_mb: float = 0.0


class ResourceSampler:
    """Samples RSS of named processes every ``interval_s``; CPU time by difference."""

    def __init__(self, pids: dict[str, int], interval_s: float = 0.2) -> None:
        self._procs = {name: psutil.Process(pid) for name, pid in pids.items()}
        self._interval_s = interval_s
        self._cpu0: dict[str, float] = {}
        self._rss: dict[str, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample_loop, daemon=True)

    def __enter__(self) -> ResourceSampler:
        self._cpu0 = {name: _cpu(p) for name, p in self._procs.items()}
        self._cpu_last = dict(self._cpu0)  # a process that exits keeps what it had used
        self._rss = dict.fromkeys(self._procs, 0.0)
        self._thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def usage(self) -> dict[str, Usage]:
        return {
            name: Usage(
                cpu_s=max(_cpu(p), self._cpu_last[name]) - self._cpu0[name],
                rss_max_mb=self._rss[name],
            )
            for name, p in self._procs.items()
        }

    def _sample_loop(self) -> None:
        while not self._stop.wait(self._interval_s):
            for name, proc in self._procs.items():
                try:
                    rss = proc.memory_info().rss / 2**20
                except psutil.Error:
                    continue
                self._rss[name] = max(self._rss[name], rss)
                self._cpu_last[name] = max(self._cpu_last[name], _cpu(proc))


def _cpu(proc: psutil.Process) -> float:
    try:
        times = proc.cpu_times()
    except psutil.Error:
        return 0.0
    return float(times.user + times.system)


def service_pids(settings: Settings) -> dict[str, int]:
    """The local broker's and Redis's pids (for the CPU breakdown), when we can find them."""
    found: dict[str, int] = {}
    for name, path in (
        ("kafka", settings.home / "kafka" / "kafka.pid"),
        ("redis", settings.home / "redis" / "redis.pid"),
    ):
        try:
            pid = int(path.read_text().strip())
        except (OSError, ValueError):
            continue
        if psutil.pid_exists(pid):
            found[name] = pid
    return found

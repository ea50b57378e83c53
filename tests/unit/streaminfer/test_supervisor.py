"""The stage supervisor (``streaminfer stage NAME --workers N``) with tiny Python children."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from streaminfer.supervisor import EXIT_CRASH_LOOP, RestartPolicy, Supervisor

REPO = Path(__file__).resolve().parents[3]

# A worker stand-in: registers for SIGTERM on its parent's death, counts its starts, exits 3
# for its first CRASHES starts (or after RUN_S seconds), else waits for SIGTERM and exits 0.
CHILD = """
import os, signal, sys, time
from pathlib import Path
from streaminfer.supervisor import die_with_parent
state, slot, crashes, run_s, parent = sys.argv[1:]
die_with_parent(int(parent))
starts = Path(state) / f"starts-{slot}"
with starts.open("a") as f:
    f.write(f"{os.getpid()}\\n")
if len(starts.read_text().split()) <= int(crashes):
    time.sleep(float(run_s))
    sys.exit(3)
signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
(Path(state) / f"ready-{slot}-{os.getpid()}").touch()
while True:
    signal.pause()
"""

# A supervisor process of two such children, stopped by SIGTERM like `streaminfer stage`.
PARENT = """
import os, signal, subprocess, sys, threading
from streaminfer.supervisor import RestartPolicy, Supervisor
child, state = sys.argv[1:]
stop = threading.Event()
signal.signal(signal.SIGTERM, lambda *_: stop.set())
def start(slot):
    argv = [sys.executable, "-c", child, state, str(slot), "0", "0", str(os.getpid())]
    return subprocess.Popen(argv)
sys.exit(Supervisor(label="t", slots=2, start=start, policy=RestartPolicy()).run(stop))
"""


def _wait_for(condition: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"timed out after {timeout_s} s waiting for {what}"
        time.sleep(0.02)


def _alive(pid: int) -> bool:
    """Running, as opposed to gone or a zombie nobody reaped yet."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")


def _pids(state: Path, slot: int) -> list[int]:
    path = state / f"starts-{slot}"
    return [int(p) for p in path.read_text().split()] if path.exists() else []


class Children:
    """``start`` for a Supervisor: CHILD processes, with the time of every start."""

    def __init__(self, state: Path, *, crashes: dict[int, int], run_s: float = 0.0) -> None:
        self.state = state
        self.crashes = crashes
        self.run_s = run_s
        self.started: dict[int, list[float]] = {}
        self.procs: list[subprocess.Popen[bytes]] = []

    def __call__(self, slot: int) -> subprocess.Popen[bytes]:
        self.started.setdefault(slot, []).append(time.monotonic())
        crashes = str(self.crashes.get(slot, 0))
        argv = [sys.executable, "-c", CHILD, str(self.state), str(slot), crashes]
        proc = subprocess.Popen([*argv, str(self.run_s), str(os.getpid())], cwd=REPO)
        self.procs.append(proc)
        return proc

    def ready(self, slot: int) -> bool:
        return any(self.state.glob(f"ready-{slot}-*"))


@pytest.fixture
def supervise() -> Iterator[Callable[[Supervisor], tuple[threading.Event, list[int]]]]:
    """Runs a Supervisor in a thread; stops it (and checks it ended) after the test."""
    runs: list[tuple[threading.Thread, threading.Event]] = []

    def run(supervisor: Supervisor) -> tuple[threading.Event, list[int]]:
        stop, result = threading.Event(), []
        thread = threading.Thread(target=lambda: result.append(supervisor.run(stop)))
        thread.start()
        runs.append((thread, stop))
        return stop, result

    yield run
    for thread, stop in runs:
        stop.set()
        thread.join(timeout=30)
        assert not thread.is_alive()


def test_backoff_doubles_up_to_the_cap() -> None:
    policy = RestartPolicy(backoff_s=1.0, backoff_max_s=5.0)
    assert [policy.backoff(n) for n in range(6)] == [1.0, 1.0, 2.0, 4.0, 5.0, 5.0]


def test_a_crashed_worker_is_restarted_after_a_growing_backoff(
    tmp_path: Path, supervise: Callable[[Supervisor], tuple[threading.Event, list[int]]]
) -> None:
    children = Children(tmp_path, crashes={0: 2})
    policy = RestartPolicy(backoff_s=0.2, backoff_max_s=5.0, crash_loop_limit=5)
    stop, result = supervise(Supervisor(label="t", slots=2, start=children, policy=policy))

    _wait_for(lambda: children.ready(0) and children.ready(1), 20, "both slots running")
    starts = children.started[0]
    assert len(starts) == 3  # two crashes, two restarts
    assert starts[1] - starts[0] >= 0.2
    assert starts[2] - starts[1] >= 0.2 * 2  # doubled after the second quick exit
    assert len(children.started[1]) == 1  # the healthy slot was left alone

    stop.set()
    _wait_for(lambda: bool(result), 20, "the supervisor to stop")
    assert result == [0]  # every worker drained cleanly on SIGTERM
    assert all(proc.poll() is not None for proc in children.procs)


def test_a_crash_loop_stops_the_stage_with_the_reason(
    tmp_path: Path,
    supervise: Callable[[Supervisor], tuple[threading.Event, list[int]]],
    caplog: pytest.LogCaptureFixture,
) -> None:
    children = Children(tmp_path, crashes={0: 1000})
    policy = RestartPolicy(backoff_s=0.05, backoff_max_s=0.2, crash_loop_limit=3)
    with caplog.at_level(logging.INFO, logger="streaminfer.supervisor"):
        _stop, result = supervise(Supervisor(label="t", slots=2, start=children, policy=policy))
        _wait_for(lambda: bool(result), 20, "the supervisor to give up")

    assert result == [EXIT_CRASH_LOOP]
    assert len(children.started[0]) == 3
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert any("t[0] exited with code 3" in e and "crash loop" in e for e in errors), errors
    assert all(proc.poll() is not None for proc in children.procs)  # slot 1 was stopped too


def test_a_worker_that_ran_a_while_does_not_count_towards_a_crash_loop(
    tmp_path: Path, supervise: Callable[[Supervisor], tuple[threading.Event, list[int]]]
) -> None:
    # Each start lives 0.25 s, longer than reset_after_s: never a crash loop, even at limit 2.
    children = Children(tmp_path, crashes={0: 3}, run_s=0.25)
    policy = RestartPolicy(backoff_s=0.05, crash_loop_limit=2, reset_after_s=0.1)
    _stop, result = supervise(Supervisor(label="t", slots=1, start=children, policy=policy))

    _wait_for(lambda: children.ready(0), 20, "the fourth start to stay up")
    assert len(children.started[0]) == 4
    assert result == []  # still supervising


def _start_parent(tmp_path: Path) -> subprocess.Popen[bytes]:
    parent = subprocess.Popen([sys.executable, "-c", PARENT, CHILD, str(tmp_path)], cwd=REPO)
    _wait_for(lambda: len(list(tmp_path.glob("ready-*"))) == 2, 20, "two children running")
    return parent


def test_sigterm_to_the_supervisor_stops_every_worker(tmp_path: Path) -> None:
    parent = _start_parent(tmp_path)
    children = _pids(tmp_path, 0) + _pids(tmp_path, 1)
    assert all(_alive(pid) for pid in children)

    parent.send_signal(signal.SIGTERM)
    assert parent.wait(timeout=20) == 0
    assert not any(_alive(pid) for pid in children)


def test_workers_die_with_a_killed_supervisor(tmp_path: Path) -> None:
    parent = _start_parent(tmp_path)
    children = _pids(tmp_path, 0) + _pids(tmp_path, 1)

    parent.kill()  # SIGKILL: no chance to forward anything
    parent.wait(timeout=20)
    _wait_for(lambda: not any(_alive(pid) for pid in children), 20, "orphans to exit")

"""Process supervision for ``streaminfer stage NAME --workers N`` (streaminfer/workers.py).

Kept free of the pipeline's imports: a worker process calls :func:`die_with_parent` first
thing, and the tests supervise tiny Python children with :class:`Supervisor`.
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

log = logging.getLogger(__name__)

EXIT_CRASH_LOOP = 1
DRAIN_TIMEOUT_S = 60.0  # a stopping worker that has not drained by then is killed
_TICK_S = 0.1
_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def die_with_parent(parent_pid: int) -> None:
    """Ask the kernel to SIGTERM this process when ``parent_pid`` (its parent) dies.

    SIGTERM, not SIGKILL: the worker then drains like on any stop. Linux only; elsewhere the
    workers outlive a killed supervisor (a graceful stop still reaches them)."""
    if not sys.platform.startswith("linux"):
        log.warning("not Linux: workers will not stop if the supervisor is killed")
        return
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0) != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, f"prctl(PR_SET_PDEATHSIG): {os.strerror(errno)}")
    if os.getppid() != parent_pid:  # the parent died before the request was in place
        os.kill(os.getpid(), signal.SIGTERM)


@dataclass(frozen=True, slots=True)
class RestartPolicy:
    """When and how often a worker that exited is started again.

    An exit within ``reset_after_s`` of the worker's start is a quick exit: the wait before the
    next start doubles from ``backoff_s`` up to ``backoff_max_s``, and ``crash_loop_limit``
    quick exits in a row of one slot stop the stage. A worker that ran longer starts over."""

    backoff_s: float = 1.0
    backoff_max_s: float = 30.0
    crash_loop_limit: int = 5
    reset_after_s: float = 60.0

    def backoff(self, quick_exits: int) -> float:
        """Wait before the next start after ``quick_exits`` quick exits in a row."""
        return float(min(self.backoff_max_s, self.backoff_s * 2 ** max(0, quick_exits - 1)))


class Child(Protocol):
    """What the supervisor needs of a worker process (``subprocess.Popen`` is one)."""

    pid: int

    def poll(self) -> int | None: ...
    def send_signal(self, sig: int) -> None: ...
    def kill(self) -> None: ...
    def wait(self, timeout: float | None = None) -> int: ...


@dataclass(slots=True)
class _Slot:
    index: int
    child: Child | None = None
    started_at: float = 0.0
    quick_exits: int = 0
    start_at: float | None = 0.0  # when to (re)start; None while running


class CrashLoop(Exception):
    """A worker slot kept exiting soon after it started; the stage gives up."""


class Supervisor:
    """Keeps ``slots`` workers running until ``stop`` is set; the rules are in the docstring
    of streaminfer/workers.py. ``start(slot)`` starts the worker of a slot."""

    def __init__(
        self,
        *,
        label: str,
        slots: int,
        start: Callable[[int], Child],
        policy: RestartPolicy,
        on_exit: Callable[[int, int], None] = lambda _slot, _code: None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._label = label
        self._on_exit = on_exit  # (slot, exit code) of a worker that exited unasked
        self._start = start
        self._policy = policy
        self._clock = clock
        self._slots = [_Slot(index) for index in range(slots)]

    def run(self, stop: threading.Event) -> int:
        """Supervise until ``stop`` is set or a slot crash-loops; returns the exit code."""
        try:
            while not stop.is_set():
                self._tick()
                stop.wait(_TICK_S)
        except CrashLoop as exc:
            log.error("%s", exc)
            self._stop_all()
            return EXIT_CRASH_LOOP
        return 0 if self._stop_all() else 1

    def _tick(self) -> None:
        now = self._clock()
        for slot in self._slots:
            if slot.child is not None and (code := slot.child.poll()) is not None:
                self._exited(slot, code, now)
            if slot.start_at is not None and now >= slot.start_at:
                slot.child = self._start(slot.index)
                slot.started_at, slot.start_at = now, None
                log.info("%s[%d] started (pid %d)", self._label, slot.index, slot.child.pid)

    def _exited(self, slot: _Slot, code: int, now: float) -> None:
        ran = now - slot.started_at
        slot.child = None
        self._on_exit(slot.index, code)
        # Only quick exits count towards a crash loop; a worker that ran a while starts over.
        slot.quick_exits = slot.quick_exits + 1 if ran < self._policy.reset_after_s else 0
        who = f"{self._label}[{slot.index}] {_describe(code)} after {ran:.1f} s"
        if slot.quick_exits >= self._policy.crash_loop_limit:
            raise CrashLoop(
                f"{who}: {slot.quick_exits} exits in a row, each within "
                f"{self._policy.reset_after_s:g} s of its start: crash loop, stopping the stage "
                "(the worker's log above says why)"
            )
        wait = self._policy.backoff(slot.quick_exits)
        slot.start_at = now + wait
        log.warning(
            "%s; restarting in %.1f s (quick exit %d of %d allowed)",
            who,
            wait,
            slot.quick_exits,
            self._policy.crash_loop_limit - 1,
        )

    def _stop_all(self) -> bool:
        """SIGTERM every worker, wait for it to drain (SIGKILL after DRAIN_TIMEOUT_S).
        True when every one exited cleanly."""
        running = [s for s in self._slots if s.child is not None and s.child.poll() is None]
        for slot in running:
            assert slot.child is not None
            slot.child.send_signal(signal.SIGTERM)
        deadline = self._clock() + DRAIN_TIMEOUT_S
        clean = True
        for slot in running:
            assert slot.child is not None
            try:
                code = slot.child.wait(timeout=max(0.0, deadline - self._clock()))
            except subprocess.TimeoutExpired:
                log.error("%s[%d] did not drain in time: killed", self._label, slot.index)
                slot.child.kill()
                code = slot.child.wait()
            if code not in (0, -signal.SIGTERM):
                log.error("%s[%d] %s while stopping", self._label, slot.index, _describe(code))
                clean = False
        return clean


def _describe(code: int) -> str:
    if code < 0:
        try:
            return f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with code {code}"

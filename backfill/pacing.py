"""Rate limit and progress line for a running backfill."""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TextIO


class TokenBucket:
    """``rate`` tokens per second, at most ``burst`` saved up (default: a tenth of a second's
    worth, at least one), so a backfill never sends more than ``rate * t + burst`` in ``t``."""

    def __init__(
        self,
        rate: float,
        *,
        burst: float | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if rate <= 0:
            raise ValueError("rate must be positive")
        self.rate = rate
        self.burst = burst if burst is not None else max(1.0, rate / 10)
        self._clock = clock
        self._tokens = self.burst
        self._at = clock()

    def take(self) -> float:
        """Take one token; returns 0, or the seconds to wait before the token is yours."""
        now = self._clock()
        self._tokens = min(self.burst, self._tokens + (now - self._at) * self.rate)
        self._at = now
        self._tokens -= 1
        return 0.0 if self._tokens >= 0 else -self._tokens / self.rate


@dataclass(slots=True)
class Snapshot:
    """What the progress line shows."""

    done: int
    total: int | None
    rejected: int
    dead_lettered: int
    source: str


class ProgressLine:
    """One stderr line, rewritten in place on a terminal (or a new line every
    ``plain_interval_s`` when stderr is a file, e.g. a CI log)."""

    def __init__(
        self,
        label: str,
        *,
        out: TextIO = sys.stderr,
        clock: Callable[[], float] = time.monotonic,
        plain_interval_s: float = 5.0,
    ) -> None:
        self._label = label
        self._out = out
        self._clock = clock
        self._tty = out.isatty()
        self._interval = 0.25 if self._tty else plain_interval_s
        self._started = clock()
        self._base: int | None = None  # rows done before this run (a resume)
        self._shown_at = -math.inf

    def update(self, snapshot: Snapshot, *, force: bool = False) -> None:
        now = self._clock()
        if self._base is None:
            self._base = snapshot.done
        if not force and now - self._shown_at < self._interval:
            return
        self._shown_at = now
        text = self.render(snapshot, now - self._started)
        self._out.write(f"\r\x1b[2K{text}" if self._tty else f"{text}\n")
        self._out.flush()

    def finish(self) -> None:
        if self._tty:
            self._out.write("\n")
            self._out.flush()

    def rows_per_s(self, done: int) -> float:
        elapsed = self._clock() - self._started
        return (done - (self._base or 0)) / elapsed if elapsed > 0 else 0.0

    def render(self, s: Snapshot, elapsed: float) -> str:
        rate = (s.done - (self._base or 0)) / elapsed if elapsed > 0 else 0.0
        if s.total:
            share = min(s.done / s.total, 1.0)
            bar = "#" * int(share * 20)
            count = f"[{bar:<20}] {s.done:,}/{s.total:,} rows {share:4.0%}"
            eta = _duration((s.total - s.done) / rate) if rate > 0 and s.total > s.done else "-"
        else:
            count, eta = f"{s.done:,} rows", "-"
        return (
            f"{self._label} {count}  {rate:,.0f} rows/s  ETA {eta}  "
            f"rejects {s.rejected:,}  DLQ {s.dead_lettered:,}  {s.source}"
        )


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"

"""``streaminfer bench --profile``: py-spy samples every stage process during the closed loop
and the report keeps each stage's top frames (self time and inclusive time)."""

from __future__ import annotations

import collections
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

from bench.pipelines import FUSED, STAGES


class StageProfiler:
    """``py-spy record -f raw`` attached to each stage pid until :meth:`stop`."""

    def __init__(self, pids: dict[str, int], out_dir: Path, label: str) -> None:
        self._pids = {s: pid for s, pid in pids.items() if s.partition("-")[0] in (*STAGES, *FUSED)}
        self._out_dir = out_dir
        self._label = label.replace(" ", "_").replace("(", "").replace(")", "")
        self._procs: dict[str, subprocess.Popen[bytes]] = {}

    def start(self) -> None:
        py_spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
        self._out_dir.mkdir(parents=True, exist_ok=True)
        for stage, pid in self._pids.items():
            self._procs[stage] = subprocess.Popen(
                [
                    py_spy,
                    "record",
                    "-p",
                    str(pid),
                    "-r",
                    "100",
                    "-f",
                    "raw",
                    "-o",
                    str(self._path(stage)),
                ],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )

    def stop(self) -> dict[str, Any]:
        """Stop sampling (SIGINT makes py-spy write its file); top frames per stage."""
        for proc in self._procs.values():
            proc.send_signal(signal.SIGINT)
        for proc in self._procs.values():
            proc.wait(timeout=30)
        return {
            stage: top_frames(self._path(stage))
            for stage in self._procs
            if self._path(stage).exists()
        }

    def _path(self, stage: str) -> Path:
        return self._out_dir / f"{self._label}-{stage}.raw.txt"


def top_frames(path: Path, limit: int = 12) -> dict[str, Any]:
    """Self and inclusive sample shares of the busiest frames of a py-spy raw profile."""
    own: collections.Counter[str] = collections.Counter()
    inclusive: collections.Counter[str] = collections.Counter()
    total = 0
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        frames = stack.split(";")
        total += int(count)
        own[frames[-1]] += int(count)
        for frame in set(frames):
            inclusive[frame] += int(count)

    def share(counter: collections.Counter[str]) -> list[tuple[str, float]]:
        return [(frame, round(100 * n / total, 1)) for frame, n in counter.most_common(limit)]

    return {"samples": total, "self": share(own), "inclusive": share(inclusive)}

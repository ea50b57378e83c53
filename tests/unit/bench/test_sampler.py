"""The benchmark's per-process CPU sampler (bench/pipelines.py ResourceSampler)."""

from __future__ import annotations

import subprocess
import sys

from bench.pipelines import ResourceSampler

BURN = "import time\nt = time.process_time()\nwhile time.process_time() - t < 0.3: pass\n"


def test_a_process_that_exits_in_the_window_keeps_the_cpu_it_used() -> None:
    # A service restarted mid-scenario (or a stage that crashed) must not show up as
    # negative CPU: the sampler keeps the last reading of a process that is gone.
    proc = subprocess.Popen(
        [sys.executable, "-c", "import sys; sys.stdin.read()\n" + BURN], stdin=subprocess.PIPE
    )
    with ResourceSampler({"burner": proc.pid}, interval_s=0.02) as sampler:
        proc.communicate(b"", timeout=30)  # EOF on stdin: burn 0.3 s of CPU, then exit
        usage = sampler.usage()
    assert proc.returncode == 0
    assert usage["burner"].cpu_s > 0.1

"""``streaminfer stage NAME --workers N``: N processes, each one consumer-group member.

With one worker (and no ``--supervise``) the stage runs in this process, and whatever started
it (compose, Kubernetes, systemd, a test) is the supervisor: exit codes and signals reach it
directly. Otherwise this process is the supervisor of N worker processes
(``streaminfer stage NAME --slot K``):

- a worker that exits while the stage is not stopping is started again in the same slot
  (same ``transactional.id`` and ``group.instance.id``: it fences its predecessor and takes
  its partitions back without a rebalance), after a back-off that doubles on each quick exit;
- a worker that keeps exiting soon after it starts (a crash loop) stops the whole stage with
  exit code 1 and the reason in the log, so the outer supervisor or the operator sees it
  instead of a stage that silently restarts forever;
- SIGTERM/SIGINT are forwarded to every worker, which drains (finishes its batch, commits,
  closes); the supervisor waits for them;
- workers die with the supervisor even when it is SIGKILLed: each asks the kernel for SIGTERM
  on its parent's death (``PR_SET_PDEATHSIG``, Linux), so no orphan keeps consuming.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import threading
from types import FrameType

from stages.committers import EXIT_STUCK
from stages.errors import ConsumerFailed
from streaminfer.kafka import partition_count
from streaminfer.logs import configure as configure_logging
from streaminfer.monitoring import worker_exit_metrics
from streaminfer.settings import Settings
from streaminfer.supervisor import RestartPolicy, Supervisor, die_with_parent
from streaminfer.wiring import StageName, build_runner, input_topics

log = logging.getLogger(__name__)


def install_stop_handlers(stop: threading.Event) -> None:
    """SIGTERM and SIGINT set ``stop``: the runner finishes its batch, commits and closes."""

    def handler(signum: int, _frame: FrameType | None) -> None:
        log.info("signal %s: draining", signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)


def run_worker(settings: Settings, name: StageName, slot: int) -> None:
    """Body of one worker process (or of the CLI process when --workers 1)."""
    configure_logging(settings.log_format, stage=name, worker=f"{name}[{slot}]")
    stop = threading.Event()
    install_stop_handlers(stop)
    try:
        build_runner(settings, name, slot=slot).run(stop)
    except ConsumerFailed as exc:
        # Restartable, like the transactional watchdog's exit: a fresh worker rejoins.
        log.critical("%s; exiting with %d so that a fresh worker takes over", exc, EXIT_STUCK)
        raise SystemExit(EXIT_STUCK) from exc


def run_supervised_worker(
    settings: Settings, name: StageName, slot: int, supervisor_pid: int | None
) -> int:
    """``streaminfer stage NAME --slot K``: a worker started by :func:`run_stage`."""
    die_with_parent(os.getppid() if supervisor_pid is None else supervisor_pid)
    run_worker(settings, name, slot)
    return 0


def run_stage(settings: Settings, name: StageName, workers: int, *, supervise: bool) -> int:
    """Run ``workers`` members of stage ``name``; returns the process exit code."""
    warn_if_overprovisioned(settings, name, workers)
    if workers == 1 and not supervise:
        run_worker(settings, name, 0)
        return 0
    configure_logging(settings.log_format, stage=name, worker=f"{name}[supervisor]")
    stop = threading.Event()
    install_stop_handlers(stop)
    supervisor = Supervisor(
        label=name,
        slots=workers,
        start=lambda slot: _start_worker(name, slot),
        policy=restart_policy(settings),
        on_exit=worker_exit_metrics(settings, name, workers),
    )
    return supervisor.run(stop)


def _start_worker(name: StageName, slot: int) -> subprocess.Popen[bytes]:
    # The worker reads the same environment (and .env, from the same cwd) as this process.
    argv = ["stage", name, "--slot", str(slot), "--supervisor-pid", str(os.getpid())]
    return subprocess.Popen([sys.executable, "-m", "streaminfer.cli", *argv])


def restart_policy(settings: Settings) -> RestartPolicy:
    stage = settings.stage
    return RestartPolicy(
        backoff_s=stage.restart_backoff_s,
        backoff_max_s=stage.restart_backoff_max_s,
        crash_loop_limit=stage.crash_loop_limit,
        reset_after_s=stage.restart_reset_s,
    )


def warn_if_overprovisioned(settings: Settings, name: StageName, workers: int) -> None:
    """Partitions bound parallelism: say so when some workers would sit idle."""
    try:
        partitions = partition_count(settings, input_topics(settings, name)[0])
    except Exception as exc:  # the broker may not be up yet; the consumer will keep retrying
        log.debug("could not read partition count: %s", exc)
        return
    if 0 < partitions < workers:
        log.warning(
            "%d workers but %s has %d partitions: %d workers will be idle "
            "(raise STREAMINFER_TOPIC_PARTITIONS / add partitions to scale further)",
            workers,
            input_topics(settings, name)[0],
            partitions,
            workers - partitions,
        )

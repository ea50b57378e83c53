"""``streaminfer stage NAME --workers N``: N processes, each one consumer-group member.

With one worker the stage runs in this process. With more, this process supervises: it
forwards SIGTERM/SIGINT to every worker, waits for them to drain, and exits non-zero if a
worker failed.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import signal
import threading
from types import FrameType

from streaminfer.kafka import partition_count
from streaminfer.settings import Settings
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
    _configure_logging(f"{name}[{slot}]")
    stop = threading.Event()
    install_stop_handlers(stop)
    build_runner(settings, name, slot=slot).run(stop)


def run_stage(settings: Settings, name: StageName, workers: int) -> int:
    """Run ``workers`` members of stage ``name``; returns the process exit code."""
    warn_if_overprovisioned(settings, name, workers)
    if workers == 1:
        run_worker(settings, name, 0)
        return 0
    ctx = mp.get_context("spawn")
    procs = [
        ctx.Process(target=run_worker, args=(settings, name, slot), name=f"{name}-{slot}")
        for slot in range(workers)
    ]
    for proc in procs:
        proc.start()

    def forward(signum: int, _frame: FrameType | None) -> None:
        for proc in procs:
            if proc.is_alive() and proc.pid is not None:
                proc.terminate()  # SIGTERM: each worker drains on its own

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    for proc in procs:
        proc.join()
    failed = [p.name for p in procs if p.exitcode not in (0, -signal.SIGTERM)]
    if failed:
        log.error("workers failed: %s", ", ".join(failed))
        return 1
    return 0


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


def _configure_logging(who: str) -> None:
    logging.basicConfig(
        level=logging.INFO,
        format=f"%(asctime)s {who} %(levelname)s %(name)s: %(message)s",
        force=True,
    )

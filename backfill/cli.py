"""``streaminfer backfill``, ``replay`` and ``export``: arguments and command bodies.

Only argparse is imported at module level: ``streaminfer --help`` stays fast.
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from backfill.checkpoint import Checkpoint, CheckpointStore
    from backfill.context import BackfillContext
    from backfill.engine import RunOutcome
    from backfill.plan import Plan

EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


def add_parsers(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register the three commands on the CLI's subparsers."""
    backfill = sub.add_parser(
        "backfill", help="send files (CSV, JSON lines, Parquet) for inference"
    )
    backfill.add_argument("paths", nargs="*", metavar="PATH", help="files or directories")
    backfill.add_argument("--model", help="model name (required unless --resume)")
    backfill.add_argument("--version", help="model version (default: the model's default)")
    backfill.add_argument("--format", choices=["auto", "csv", "jsonl", "parquet"], default="auto")
    backfill.add_argument(
        "--columns",
        action="append",
        metavar="SPEC",
        help="COL[,COL...] (one-input model) or INPUT=COL[,COL...]; globs allowed; repeatable",
    )
    _add_run_options(backfill, "--backfill-id")

    replay = sub.add_parser("replay", help="re-send stored requests of a time window as a backfill")
    replay.add_argument("--from", dest="from_", metavar="TIME", help="ISO 8601 (UTC) or epoch s")
    replay.add_argument("--to", metavar="TIME", help="exclusive end (default: now)")
    replay.add_argument("--model", help="replay this model's requests (required unless --resume)")
    replay.add_argument("--version", help="send them to this version (default: the default)")
    _add_run_options(replay, "--replay-id")

    export = sub.add_parser("export", help="write a backfill's results to Parquet or JSON lines")
    export.add_argument("--backfill-id", required=True)
    export.add_argument(
        "--to", required=True, type=Path, metavar="FILE", help="*.parquet or *.jsonl"
    )
    export.add_argument(
        "--wait",
        type=float,
        default=0.0,
        metavar="S",
        help="wait up to S seconds for missing results",
    )
    export.add_argument(
        "--show",
        type=int,
        default=20,
        metavar="N",
        help="list up to N dead-lettered or missing rows",
    )


def _add_run_options(parser: argparse.ArgumentParser, id_flag: str) -> None:
    parser.add_argument(id_flag, dest="backfill_id", metavar="ID", help="default: generated")
    parser.add_argument("--resume", action="store_true", help="continue from its checkpoint")
    parser.add_argument("--rate", type=_positive, help="at most N rows per second")


def run_backfill(context: BackfillContext, args: argparse.Namespace) -> int:
    from backfill.plan import plan_files

    return _guarded(lambda: _run(context, args, plan_files))


def run_replay(context: BackfillContext, args: argparse.Namespace) -> int:
    from backfill.plan import plan_replay

    return _guarded(lambda: _run(context, args, plan_replay))


def run_export(context: BackfillContext, args: argparse.Namespace) -> int:
    from backfill.export import check_destination, export_backfill

    def body() -> int:
        check_destination(args.to)
        report = export_backfill(
            context, args.backfill_id, args.to, wait_s=args.wait, show=args.show
        )
        print("\n".join(report.lines()))
        return 0 if report.complete else 1

    return _guarded(body)


def _guarded(body: Callable[[], int]) -> int:
    from backfill.mapping import MappingError
    from backfill.plan import UsageError
    from schemas.models import UnknownModel

    try:
        return body()
    except (UsageError, MappingError, UnknownModel) as exc:
        print(f"streaminfer: {exc}", file=sys.stderr)
        return EXIT_USAGE


def _run(
    context: BackfillContext,
    args: argparse.Namespace,
    plan: Callable[[BackfillContext, argparse.Namespace], Plan],
) -> int:
    from backfill.plan import start_run

    planned = plan(context, args)
    stop = threading.Event()
    try:
        with _stop_on_signals(stop), start_run(context, planned, stop=stop, rate=args.rate) as run:
            outcome = run.run(planned.sources)
    except KeyboardInterrupt:
        print(
            f"\nquit: the checkpoint {planned.store.path(planned.checkpoint.backfill_id)} is as "
            "of its last save; --resume sends the rows after it again",
            file=sys.stderr,
        )
        return EXIT_INTERRUPTED
    _print_summary(planned.store, run.checkpoint, outcome, run.dead_lettered)
    return {"done": 0, "interrupted": EXIT_INTERRUPTED, "failed": 1}[outcome.status]


@contextmanager
def _stop_on_signals(stop: threading.Event) -> Iterator[None]:
    """First SIGINT/SIGTERM: stop reading, wait for Kafka's acknowledgements, save the
    checkpoint. A second SIGINT quits at once (the checkpoint on disk is still consistent,
    just older)."""

    def handler(signum: int, _frame: FrameType | None) -> None:
        if stop.is_set() and signum == signal.SIGINT:
            raise KeyboardInterrupt
        stop.set()
        print(
            "\nstopping: waiting for Kafka to acknowledge what was sent (Ctrl-C again to quit now)",
            file=sys.stderr,
        )

    previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for signum, old in previous.items():
            signal.signal(signum, old)


def _print_summary(
    store: CheckpointStore, checkpoint: Checkpoint, outcome: RunOutcome, dead_lettered: int
) -> None:
    bid = checkpoint.backfill_id
    sources = checkpoint.sources
    rate = outcome.sent_this_run / outcome.seconds if outcome.seconds > 0 else 0.0
    lines = [
        f"{'backfill' if checkpoint.kind == 'files' else 'replay'} {bid}: {outcome.status}"
        + (f" ({outcome.error})" if outcome.error else ""),
        f"  sources       {len(sources)} ({sum(s.complete for s in sources)} complete)",
        f"  rows sent     {checkpoint.sent:,} acknowledged by Kafka "
        f"({outcome.sent_this_run:,} this run, {rate:,.0f} rows/s)",
        f"  rejected      {checkpoint.rejected:,} rows could not become requests"
        + (f" -> {store.rejects_path(bid)}" if checkpoint.rejected else ""),
        f"  dead letters  {dead_lettered:,} so far (results keep arriving after this command)",
        f"  checkpoint    {store.path(bid)}",
    ]
    if outcome.status != "done":
        command = "backfill --backfill-id" if checkpoint.kind == "files" else "replay --replay-id"
        lines.append(f"  resume with   streaminfer {command} {bid} --resume")
    lines.append(f"  results       streaminfer export --backfill-id {bid} --to {bid}.parquet")
    print("\n".join(lines))


def _positive(text: str) -> float:
    value = float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text} is not a positive number")
    return value

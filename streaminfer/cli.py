"""The ``streaminfer`` command line."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from collections.abc import Sequence

from backfill.cli import add_parsers as add_backfill_parsers
from streaminfer.logs import configure as configure_logging
from streaminfer.models_cli import add_parsers as add_models_parsers
from streaminfer.settings import Settings
from streaminfer.wiring import ALL_STAGE_NAMES


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="streaminfer", description="Kafka-backed streaming inference pipeline."
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    up = sub.add_parser(
        "up",
        help="start the local stack (Kafka, Redis, topics, the stages of "
        "STREAMINFER_STAGE_TOPOLOGY: validate, infer, persist; or fused)",
    )
    up.add_argument("--workers", type=int, default=1, help="members per stage (default 1)")
    up.add_argument("--wait", action="store_true", help="wait until every stage has joined")
    up.add_argument(
        "--monitoring",
        action="store_true",
        help="also start a local Prometheus (installed from Debian's package when missing) "
        "scraping every worker, with the alert rules of ops/prometheus/",
    )
    up.add_argument(
        "--prometheus-port", type=int, default=9190, help="with --monitoring (default 9190)"
    )
    sub.add_parser("down", help="stop the local stack")
    status = sub.add_parser(
        "status", help="one screen: groups, lag, rates, dead letters, models, health"
    )
    status.add_argument("--watch", action="store_true", help="keep refreshing (Ctrl-C quits)")
    status.add_argument(
        "--interval", type=float, default=2.0, help="seconds between the rate samples (2)"
    )
    status.add_argument(
        "--plain", action="store_true", help="only the local processes, one line each"
    )

    topics = sub.add_parser("topics", help="manage topics")
    topics_sub = topics.add_subparsers(dest="topics_command", required=True, metavar="ACTION")
    create = topics_sub.add_parser("create", help="create the pipeline's topics (idempotent)")
    create.add_argument("--partitions", type=int, default=None)

    stage = sub.add_parser(
        "stage",
        help="run one stage as N consumer-group members (fused: validate, infer and persist "
        "in one process, the fused topology)",
    )
    stage.add_argument("name", choices=ALL_STAGE_NAMES)
    stage.add_argument("--workers", type=int, default=1, help="member processes (default 1)")
    stage.add_argument(
        "--supervise",
        action="store_true",
        help="with --workers 1: run the worker as a child that is restarted when it exits "
        "(always so with more workers)",
    )
    # Set by the supervisor on the worker processes it starts (streaminfer/workers.py).
    stage.add_argument("--slot", type=int, default=None, help=argparse.SUPPRESS)
    stage.add_argument("--supervisor-pid", type=int, default=None, help=argparse.SUPPRESS)

    demo = sub.add_parser("demo", help="run the digits demo end to end and print a summary")
    demo.add_argument("--repeat", type=int, default=20, help="times to send the held-out set")
    demo.add_argument("--timeout", type=float, default=180.0, help="seconds to wait for results")
    demo.add_argument("--keep-up", action="store_true", help="leave the stack running")

    schemas = sub.add_parser("schemas", help="message contracts")
    schemas_sub = schemas.add_subparsers(dest="schemas_command", required=True, metavar="ACTION")
    schemas_sub.add_parser("export", help="write schemas/jsonschema/*.json from the Structs")

    config = sub.add_parser("config", help="settings")
    config.add_argument(
        "--doc", action="store_true", help="print the table of every setting (README format)"
    )

    models = sub.add_parser("models", help="model repository")
    models_sub = models.add_subparsers(dest="models_command", required=True, metavar="ACTION")
    add_models_parsers(models_sub)  # streaminfer/models_cli.py
    _add_client_parsers(sub)
    _add_monitor_parser(sub)
    add_backfill_parsers(sub)  # backfill, replay, export (backfill/cli.py)
    # Every argument after `bench` goes to `python -m bench` unparsed (main, _cmd_bench).
    sub.add_parser(
        "bench",
        add_help=False,
        help="end-to-end benchmark: runs `python -m bench ARGS` in a source checkout",
    )
    return parser


def _add_client_parsers(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """``ingest``, ``produce``, ``results`` (handlers in streaminfer/clients.py)."""
    ingest = sub.add_parser("ingest", help="serve the HTTP API (uvicorn)")
    ingest.add_argument("--host", default=None, help="default STREAMINFER_INGEST_HOST")
    ingest.add_argument("--port", type=int, default=None, help="default STREAMINFER_INGEST_PORT")
    ingest.add_argument("--workers", type=int, default=None, help="uvicorn worker processes")
    ingest.add_argument(
        "--grpc-port",
        type=int,
        default=None,
        help="also serve the Open Inference Protocol over gRPC on this port "
        "(default STREAMINFER_INGEST_GRPC_PORT; unset: HTTP only)",
    )
    produce = sub.add_parser("produce", help="send JSON-lines requests to inference.requests")
    produce.add_argument("source", metavar="FILE|-", help="JSON lines file, or - for stdin")
    results = sub.add_parser("results", help="print inference.results as JSON lines")
    results.add_argument("--follow", action="store_true", help="keep printing new results")
    results.add_argument(
        "--from-beginning", action="store_true", help="with --follow: start at the oldest"
    )


def _add_monitor_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    # Every argument after `monitor` goes to `python -m monitor` unparsed (main, _cmd_monitor).
    sub.add_parser(
        "monitor",
        add_help=False,
        help="windowed stats and label drift per model version (faust-streaming, its own "
        "virtualenv): inference.stats and Prometheus gauges; `monitor --help` for options",
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if args.command == "bench":
        return _cmd_bench(extra)
    if args.command == "monitor":
        return _cmd_monitor(Settings(), extra)
    if extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    settings = Settings()
    configure_logging(settings.log_format)  # STREAMINFER_LOG_FORMAT=json: JSON lines
    handler = _HANDLERS[args.command]
    return handler(settings, args)


def _cmd_up(settings: Settings, args: argparse.Namespace) -> int:
    from streaminfer import stack

    try:
        stack.up(
            settings,
            workers=args.workers,
            monitoring=args.monitoring,
            prometheus_port=args.prometheus_port,
        )
    except stack.TopologyConflict as exc:
        print(f"streaminfer up: {exc}", file=sys.stderr)
        return 1
    if args.wait:
        stack.wait_for_stages(settings)
        print("every stage joined its group")
    return 0


def _cmd_down(settings: Settings, _args: argparse.Namespace) -> int:
    from streaminfer import stack

    stack.down(settings)
    return 0


def _cmd_status(settings: Settings, args: argparse.Namespace) -> int:
    from streaminfer import stack

    if args.plain:
        for line in stack.status(settings):
            print(line)
        return 0
    from streaminfer.status import show

    return show(settings, watch=args.watch, interval_s=args.interval)


def _cmd_topics(settings: Settings, args: argparse.Namespace) -> int:
    from streaminfer.kafka import create_topics

    for topic, outcome in create_topics(settings, partitions=args.partitions).items():
        print(f"{topic}: {outcome}")
    return 0


def _cmd_stage(settings: Settings, args: argparse.Namespace) -> int:
    from streaminfer.workers import run_stage, run_supervised_worker

    if args.slot is not None:
        return run_supervised_worker(settings, args.name, args.slot, args.supervisor_pid)
    if args.workers < 1:
        print("--workers must be at least 1", file=sys.stderr)
        return 2
    return run_stage(settings, args.name, args.workers, supervise=args.supervise)


def _cmd_demo(settings: Settings, args: argparse.Namespace) -> int:
    from streaminfer.demo import run_demo

    report = run_demo(
        settings, repeat=args.repeat, timeout_s=args.timeout, keep_up=args.keep_up, echo=print
    )
    print("\n".join(["", "streaminfer demo: digits", *report.lines()]))
    return 0 if report.stored == report.sent else 1


def _cmd_schemas(_settings: Settings, _args: argparse.Namespace) -> int:
    from schemas import jsonschema

    for path in jsonschema.write():
        print(path)
    return 0


def _cmd_config(settings: Settings, args: argparse.Namespace) -> int:
    if args.doc:
        from streaminfer.config_doc import table

        print(table())
        return 0
    print(settings.model_dump_json(indent=2))  # secrets print as '**********'
    return 0


def _cmd_models(settings: Settings, args: argparse.Namespace) -> int:
    from streaminfer.models_cli import run

    return run(settings, args)


def _cmd_ingest(settings: Settings, args: argparse.Namespace) -> int:
    from streaminfer.clients import run_ingest

    return run_ingest(settings, args)


def _cmd_produce(settings: Settings, args: argparse.Namespace) -> int:
    from streaminfer.clients import produce_lines

    return produce_lines(settings, args.source)


def _cmd_results(settings: Settings, args: argparse.Namespace) -> int:
    from streaminfer.clients import print_results

    return print_results(settings, follow=args.follow, from_beginning=args.from_beginning)


def _cmd_monitor(settings: Settings, monitor_args: Sequence[str]) -> int:
    """``monitor/`` runs in a virtualenv of its own (faust-streaming pins click<8.4, the product
    locks click 8.5) in ``<home>/monitor-venv``, created on first use by ``monitor/setup.sh``
    (a no-op when up to date): this process becomes
    ``<venv>/bin/python -m monitor`` in the checkout (exec, so signals reach the monitor), with
    the settings as arguments. Never imported, like ``bench/``."""
    from streaminfer.settings import REPO_ROOT

    setup = REPO_ROOT / "monitor" / "setup.sh"
    if not setup.is_file():
        print(
            "streaminfer monitor: the monitor lives in monitor/ of a source checkout and is not "
            "installed with the package",
            file=sys.stderr,
        )
        return 2
    venv = settings.home / "monitor-venv"
    subprocess.run(["bash", str(setup), str(venv)], check=True, stdout=sys.stderr)
    python = str(venv / "bin" / "python")
    argv = [python, "-m", "monitor", *_monitor_settings(settings), *monitor_args]
    sys.stdout.flush()
    sys.stderr.flush()
    os.chdir(REPO_ROOT)
    os.execv(python, argv)


def _monitor_settings(settings: Settings) -> list[str]:
    return [
        f"--bootstrap-servers={settings.kafka.bootstrap_servers}",
        f"--topic-prefix={settings.kafka.topic_prefix}",
        f"--models-dir={settings.stage.models_dir.resolve()}",
        f"--data-dir={(settings.run_dir / 'monitor').resolve()}",
        f"--replication-factor={settings.kafka.topic_replication_factor}",
    ]


def _cmd_bench(bench_args: Sequence[str]) -> int:
    """``bench/`` is repository tooling, not part of the installed package: run it as its own
    program from the checkout this package is installed from (editable install), never import
    it, so the product (and its Docker image) works without it."""
    from streaminfer.settings import REPO_ROOT

    if not (REPO_ROOT / "bench" / "__main__.py").is_file():
        print(
            "streaminfer bench: the benchmarks live in bench/ of a source checkout and are not "
            "installed with the package; run `python -m bench --help` from the repository root",
            file=sys.stderr,
        )
        return 2
    command = [sys.executable, "-m", "bench", *bench_args]
    return subprocess.run(command, cwd=REPO_ROOT, check=False).returncode


def _cmd_backfill(settings: Settings, args: argparse.Namespace) -> int:
    from backfill.cli import run_backfill
    from streaminfer.contexts import backfill_context

    return run_backfill(backfill_context(settings), args)


def _cmd_replay(settings: Settings, args: argparse.Namespace) -> int:
    from backfill.cli import run_replay
    from streaminfer.contexts import backfill_context

    return run_replay(backfill_context(settings), args)


def _cmd_export(settings: Settings, args: argparse.Namespace) -> int:
    from backfill.cli import run_export
    from streaminfer.contexts import backfill_context

    return run_export(backfill_context(settings), args)


_HANDLERS = {
    "up": _cmd_up,
    "down": _cmd_down,
    "status": _cmd_status,
    "topics": _cmd_topics,
    "stage": _cmd_stage,
    "demo": _cmd_demo,
    "schemas": _cmd_schemas,
    "config": _cmd_config,
    "models": _cmd_models,
    "ingest": _cmd_ingest,
    "produce": _cmd_produce,
    "results": _cmd_results,
    "backfill": _cmd_backfill,
    "replay": _cmd_replay,
    "export": _cmd_export,
}

if __name__ == "__main__":
    sys.exit(main())

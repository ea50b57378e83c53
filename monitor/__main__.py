"""``python -m monitor`` in the monitor's virtualenv, from the repository root.

``streaminfer monitor [ARGS]`` runs this with the Kafka and model-repository arguments taken
from the settings (``STREAMINFER_*``), followed by the user's ARGS; this module reads no
environment itself.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from monitor.stats import parse_window
from schemas.topics import Topics


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="streaminfer monitor",
        description="Windowed stats and label drift per model version (faust-streaming): "
        "closed windows go to inference.stats and to Prometheus gauges.",
    )
    # Filled in by `streaminfer monitor` from the settings.
    parser.add_argument("--bootstrap-servers", required=True)
    parser.add_argument("--topic-prefix", default="")
    parser.add_argument("--models-dir", type=Path, required=True)
    parser.add_argument("--data-dir", type=Path, required=True, help="faust's working files")
    parser.add_argument("--replication-factor", type=int, default=1)
    # The user's.
    parser.add_argument("--host", default="127.0.0.1", help="address of /metrics (127.0.0.1)")
    parser.add_argument("--port", type=int, default=9390, help="port of /metrics (9390)")
    parser.add_argument(
        "--windows",
        type=lambda text: tuple(parse_window(w) for w in text.split(",")),
        default=(10, 60),
        help="tumbling window sizes (default 10s,1m)",
    )
    parser.add_argument(
        "--grace", type=float, default=2.0, help="seconds after its end a window closes (2)"
    )
    parser.add_argument(
        "--min-drift-results",
        type=int,
        default=50,
        help="results a window needs for a drift score (50)",
    )
    parser.add_argument(
        "--from-beginning",
        action="store_true",
        help="on the monitor group's first start, read the topics from their oldest records "
        "(default: from their ends)",
    )
    parser.add_argument("--loglevel", default="info", choices=["debug", "info", "warning"])
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # Imported here: faust (and mode) set up logging and read sys.argv on import.
    from monitor.app import MonitorOptions, run

    logging.basicConfig(level=args.loglevel.upper())
    options = MonitorOptions(
        bootstrap_servers=args.bootstrap_servers,
        topics=Topics(prefix=args.topic_prefix),
        app_id=f"{args.topic_prefix}streaminfer.monitor",
        models_dir=args.models_dir,
        data_dir=args.data_dir,
        metrics_host=args.host,
        metrics_port=args.port,
        windows_s=args.windows,
        grace_s=args.grace,
        min_drift_results=args.min_drift_results,
        from_beginning=args.from_beginning,
        replication_factor=args.replication_factor,
    )
    return run(options, loglevel=args.loglevel)


if __name__ == "__main__":
    sys.exit(main())

"""``python -m bench``: the end-to-end benchmark (bench/e2e.py), run from a source checkout.

bench/ is repository tooling, not part of the installed product: ``streaminfer bench`` only
starts this module as a subprocess from the checkout's root (streaminfer/cli.py).
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from bench.options import add_arguments


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m bench",
        description="End-to-end throughput and latency of the pipeline (and of its peers).",
    )
    add_arguments(parser)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    # Heavy imports (numpy, the stack, matplotlib) only once the options are known.
    from bench.e2e import run_cli
    from streaminfer.settings import Settings

    return run_cli(Settings(), args)


if __name__ == "__main__":
    sys.exit(main())

"""``python -m bench`` options: kept free of heavy imports, so that ``--help`` answers at once."""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from streaminfer.settings import REPO_ROOT

GUARANTEES = ("exactly-once", "at-least-once")
PEERS = ("faust", "quix")


@dataclass(frozen=True, slots=True)
class ScenarioSpec:
    """One measured load: open loop at ``rate``/s for ``count``, or closed loop (rate None)."""

    name: str
    count: int
    rate: float | None = None
    window: int = 8000

    @property
    def kind(self) -> str:
        return "closed" if self.rate is None else "open"


@dataclass(frozen=True, slots=True)
class BenchOptions:
    """What to run; built from the command line by :func:`options_from_args`."""

    guarantees: tuple[str, ...]
    peers: tuple[str, ...]
    rates: tuple[float, ...]
    duration_s: float
    count: int
    window: int
    warmup: int
    timeout_s: float
    out_dir: Path
    variants: tuple[tuple[str, tuple[tuple[str, str], ...]], ...] = ()
    profile: bool = False

    def scenarios(self) -> list[ScenarioSpec]:
        open_loop = [
            ScenarioSpec(name=f"open {r:,.0f}/s", count=max(1, int(r * self.duration_s)), rate=r)
            for r in self.rates
        ]
        closed = ScenarioSpec(name="closed", count=self.count, window=self.window)
        return [*open_loop, closed]


def add_parser(sub: Any) -> None:
    """Registers ``bench`` on a parser's sub-parsers."""
    add_arguments(sub.add_parser("bench", help="end-to-end throughput/latency benchmark"))


def add_arguments(bench: argparse.ArgumentParser) -> None:
    """The benchmark's options (``python -m bench``, bench/__main__.py)."""
    bench.add_argument("--quick", action="store_true", help="small sizes (smoke test, ~30 s)")
    bench.add_argument(
        "--guarantee",
        action="append",
        choices=[*GUARANTEES, "both"],
        help="ours: exactly-once (default), at-least-once, or both (the price of exactly-once)",
    )
    bench.add_argument(
        "--peers",
        nargs="?",
        const=",".join(PEERS),
        default="",
        help="also run the peers (default faust,quix) after ours",
    )
    bench.add_argument("--rates", default=None, help="open-loop rates/s, comma-separated")
    bench.add_argument("--duration", type=float, default=None, help="seconds per open-loop rate")
    bench.add_argument("--count", type=int, default=None, help="closed-loop requests")
    bench.add_argument("--window", type=int, default=8000, help="closed-loop outstanding max")
    bench.add_argument("--timeout", type=float, default=120.0, help="wait for stragglers (s)")
    bench.add_argument("--out", type=Path, default=REPO_ROOT / "bench" / "results")
    bench.add_argument(
        "--profile", action="store_true", help="py-spy every stage during the closed loop"
    )
    bench.add_argument(
        "--variant",
        action="append",
        default=[],
        metavar="NAME:VAR=VALUE[,VAR=VALUE]",
        help="also run ours with these environment settings (tuning: before/after in one run)",
    )


def options_from_args(args: argparse.Namespace) -> BenchOptions:
    chosen = args.guarantee or ["exactly-once"]
    guarantees = GUARANTEES if "both" in chosen else tuple(dict.fromkeys(chosen))
    default_rates = "500,2000" if args.quick else "500,2000,10000"
    rates = tuple(float(r) for r in (args.rates or default_rates).split(","))
    return BenchOptions(
        guarantees=guarantees,
        peers=_peers(args.peers),
        rates=rates,
        duration_s=args.duration or (2.0 if args.quick else 10.0),
        count=args.count or (5_000 if args.quick else 100_000),
        window=args.window,
        warmup=500 if args.quick else 5_000,
        timeout_s=args.timeout,
        out_dir=args.out,
        variants=tuple(_variant(v) for v in args.variant),
        profile=args.profile,
    )


def _peers(text: str) -> tuple[str, ...]:
    chosen = tuple(p.strip() for p in text.split(",") if p.strip())
    unknown = sorted(set(chosen) - set(PEERS))
    if unknown:
        raise SystemExit(f"bench: unknown peer(s) {unknown}; choose from {list(PEERS)}")
    return chosen


def _variant(text: str) -> tuple[str, tuple[tuple[str, str], ...]]:
    """``name:A=1,B=2`` -> ("name", (("A", "1"), ("B", "2")))."""
    name, _, assignments = text.partition(":")
    pairs = [a.split("=", 1) for a in assignments.split(",") if a]
    return name, tuple((k.strip(), v.strip()) for k, v in pairs)

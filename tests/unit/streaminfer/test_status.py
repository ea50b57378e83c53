"""``streaminfer status``: the screen drawn from a made-up snapshot."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from rich.console import Console

from streaminfer.cli import build_parser
from streaminfer.status import Health, Member, ModelRouting, Snapshot, StageStatus, render


def screen(snapshot: Snapshot) -> str:
    console = Console(record=True, width=200, color_system=None)
    console.print(render(snapshot))
    return console.export_text()


BASE = Snapshot(
    taken_at=0.0,
    processes=["kafka: running", "stage infer: running (pid 42)"],
    health=[Health("kafka", True, "brokers 1@127.0.0.1:9092"), Health("redis", True, "ping 1 ms")],
    stages=[
        StageStatus(
            "infer",
            "streaminfer.infer",
            "stable",
            [Member("infer-0", "/127.0.0.1", 3), Member("infer-1", "/127.0.0.1", 3)],
            lag=12_345,
            in_rate=810.5,
            out_rate=802.25,
        ),
        StageStatus("persist", "streaminfer.persist", "empty", [], lag=None),
    ],
    dead_letters={("validate", "unknown_model"): 7, ("infer", "stage_error"): 1},
    models=[ModelRouting("digits", 4, {"1": 0.9, "2": 0.1}, ["1", "2"], "3")],
)


def snapshot(**changes: Any) -> Snapshot:
    return replace(BASE, **changes)


def test_every_stage_shows_its_members_lag_and_rates() -> None:
    text = screen(snapshot())
    infer = next(line for line in text.splitlines() if "streaminfer.infer" in line)
    assert "stable" in infer and "12,345" in infer and "810.5" in infer and "802.2" in infer
    assert "infer-0@/127.0.0.1 (3p)" in text and "infer-1@/127.0.0.1 (3p)" in text
    persist = next(line for line in text.splitlines() if "streaminfer.persist" in line)
    assert "none" in persist and "?" in persist  # no members, lag unknown


def test_dead_letters_by_stage_and_reason_and_model_shares() -> None:
    lines = screen(snapshot()).splitlines()
    assert any("validate" in row and "unknown_model" in row and " 7 " in row for row in lines)
    assert any("infer" in row and "stage_error" in row and " 1 " in row for row in lines)
    digits = next(row for row in lines if "digits" in row)
    assert "1 90%" in digits and "2 10%" in digits and " 3 " in digits


def test_health_processes_and_what_is_missing_are_said() -> None:
    down = snapshot(
        health=[Health("kafka", False, "unreachable: timed out"), Health("redis", True, "ok")],
        stages=[],
        dead_letters={},
        models=None,
        notes=["dead letters: KafkaException: boom"],
    )
    text = screen(down)
    assert "DOWN" in text and "unreachable: timed out" in text
    assert "stage infer" in text and "running (pid 42)" in text  # the plain status lines
    assert "(Kafka unreachable)" in text
    assert "no control topic" in text
    assert "note: dead letters: KafkaException: boom" in text


def test_the_cli_offers_watch_and_the_plain_lines() -> None:
    args = build_parser().parse_args(["status", "--watch", "--interval", "5"])
    assert args.watch and args.interval == 5.0 and not args.plain
    assert build_parser().parse_args(["status", "--plain"]).plain

"""STREAMINFER_STAGE_TOPOLOGY: which stages the stack and the tests run, what the fused stage
reads, and the rules wiring gives it (no broker needed)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from stages.dlq import PIPELINE_REASONS
from stages.priority import LiveLag
from streaminfer import monitoring, stack
from streaminfer.cli import build_parser
from streaminfer.settings import Settings
from streaminfer.wiring import (
    STAGE_NAMES,
    assignment_strategy,
    counted_reasons,
    downstream_watch,
    input_topics,
    priority_gate,
    topology_stages,
)


def settings_of(topology: str, run_dir: Path | None = None) -> Settings:
    settings = Settings() if run_dir is None else Settings(run_dir=run_dir)
    return settings.with_changes(stage={"topology": topology})


def test_split_is_the_default_and_fused_runs_one_stage() -> None:
    assert Settings().stage.topology == "split"
    assert topology_stages(Settings()) == STAGE_NAMES == ("validate", "infer", "persist")
    assert topology_stages(settings_of("fused")) == ("fused",)


def test_the_environment_chooses_the_topology(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STREAMINFER_STAGE_TOPOLOGY", "fused")
    assert Settings().stage.topology == "fused"
    monkeypatch.setenv("STREAMINFER_STAGE_TOPOLOGY", "diagonal")
    with pytest.raises(ValueError, match="split"):
        Settings()


def test_fused_reads_what_validate_reads_and_the_cli_runs_it() -> None:
    settings = Settings()
    assert input_topics(settings, "fused") == input_topics(settings, "validate")
    assert build_parser().parse_args(["stage", "fused"]).name == "fused"


def test_fused_keeps_the_live_rule_and_has_no_downstream_rule() -> None:
    settings = Settings()
    topics = settings.topics
    assert downstream_watch(settings, "fused") == []
    assert [t for _, t in downstream_watch(settings, "validate")] == [
        topics.validated,
        topics.results,
    ]
    gate = priority_gate(settings, "fused")
    assert gate is not None and priority_gate(settings, "infer") is None
    assigned = {(topics.requests, 0), (topics.requests_backfill, 0)}
    behind = LiveLag(lag=10**6, end=10**6)
    assert gate.decide(assigned=assigned, live=behind, reading=None, now=1.0) == {
        (topics.requests_backfill, 0)
    }
    caught_up = LiveLag(lag=0, end=10**6)
    assert gate.decide(assigned=assigned, live=caught_up, reading=None, now=2.0) == set()


def test_fused_counts_model_failures_not_bad_requests() -> None:
    fused = counted_reasons("fused")
    assert fused >= PIPELINE_REASONS and "too_large" in fused
    assert "malformed" not in fused  # validate is its first step: a bad request's reason


def test_fused_metrics_get_a_port_range_of_their_own() -> None:
    settings = Settings().with_changes(stage={"metrics_port": 9400})
    assert monitoring.stage_metrics_base(settings, "fused") == 9700


def test_up_refuses_to_start_one_topology_while_the_other_runs(tmp_path: Path) -> None:
    split, fused = settings_of("split", tmp_path), settings_of("fused", tmp_path)
    tmp_path.mkdir(exist_ok=True)
    (tmp_path / "infer.pid").write_text(f"{os.getpid()}\n")  # a live pid: "running"
    stack.check_topology(split)  # the configured topology's own stage: fine
    with pytest.raises(stack.TopologyConflict, match="infer"):
        stack.check_topology(fused)
    lines = stack.status(fused)
    assert any(line.startswith("stage fused: stopped") for line in lines)
    assert any(line.startswith("stage infer: running") for line in lines), "strays are listed"
    assert not any(line.startswith("stage validate") for line in lines)


def test_stages_reading_two_topics_split_each_topic_across_their_members() -> None:
    settings = settings_of("split")
    assert assignment_strategy(settings, "validate") == "range"
    assert assignment_strategy(settings, "fused") == "range"
    assert assignment_strategy(settings, "infer") == "cooperative-sticky"
    assert assignment_strategy(settings, "persist") == "cooperative-sticky"
    chosen = settings.with_changes(
        kafka={"consumer_extra": {"partition.assignment.strategy": "roundrobin"}}
    )
    assert assignment_strategy(chosen, "validate") == "roundrobin"

"""Models as a live fleet on the real broker: hot swap under load, a weighted split, shadow.

Each test has its own model repository (``tmp_path``: digits versions 1 and 2, version policy
"specific: [1]") and drives the control plane the way an operator does, through the
``streaminfer models`` command functions.
"""

from __future__ import annotations

import time
from collections import Counter, defaultdict
from collections.abc import Callable
from pathlib import Path

import pytest
import redis

from kafkaio.produce import RequestProducer
from schemas import Codec, ResultV1
from schemas.control import ModelState, promote, route, shadow
from schemas.keys import ResultKeys
from schemas.models import ModelSpec
from streaminfer import models_cli
from streaminfer.kafka import make_producer
from streaminfer.settings import Settings
from tests.fixtures import Load, StageProcesses, read_topic, records_written, send_digits
from tests.helpers import digits_request, holdout
from tests.model_repo import add_version, digits_repository

pytestmark = pytest.mark.integration
RESULTS = Codec(ResultV1)


@pytest.fixture()
def repo_settings(settings: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Settings:
    """The test's settings, with the model repository of its own (the stages it starts
    read it through the environment)."""
    repo = digits_repository(tmp_path / "models")
    monkeypatch.setenv("STREAMINFER_STAGE_MODELS_DIR", str(repo))
    return settings.with_changes(stage={"models_dir": repo})


def _command(settings: Settings, apply: Callable[..., ModelState], *args: object) -> None:
    """What ``streaminfer models <command>`` does: read, change, write."""

    def change(state: ModelState, spec: ModelSpec, now: float, who: str) -> ModelState:
        return apply(state, spec, *args, now=now, who=who)

    assert models_cli.change(settings, "digits", change) == 0


def _results(settings: Settings, count: int) -> list[ResultV1]:
    return [
        RESULTS.decode(m.value())
        for m in read_topic(settings, settings.topics.results, count=count)
    ]


def test_a_swap_under_load_loses_nothing_and_switches_between_batches(
    repo_settings: Settings, stages: StageProcesses
) -> None:
    settings = repo_settings
    stages.start_pipeline()
    load = Load(settings, count=12_000, rate=500, tag="swap").start()  # 24 s at 500/s
    load.wait_sent(0.4)
    commanded_at = time.time()
    _command(settings, promote, "2")
    written_at = time.time()
    load.join()
    results = _results(settings, len(load.ids))

    counts = Counter(r.id for r in results)
    assert counts == Counter(load.ids), "every request exactly one result"
    assert records_written(settings, settings.topics.dlq) == 0, "none failed"
    ordered = sorted(results, key=lambda r: r.timings["inferred"])
    versions = [r.model_version for r in ordered]
    switch = versions.index("2")
    # One infer worker runs its batches one after the other: the routing in force when a
    # batch ran is v1 up to the switch and v2 from it, so the versions never go back.
    assert set(versions[:switch]) == {"1"} and set(versions[switch:]) == {"2"}
    switched_at = ordered[switch].timings["inferred"]
    assert commanded_at <= switched_at < commanded_at + 1.0, switched_at - commanded_at
    assert min(switch, len(versions) - switch) > 2000  # both served a real share of the load
    print(
        f"swap: {len(results)} results, {switch} by v1 then {len(versions) - switch} by v2; "
        f"switch {switched_at - commanded_at:.3f}s after the command started "
        f"({switched_at - written_at:.3f}s after its write was acknowledged)"
    )


def test_a_weighted_split_read_by_workers_started_after_it_is_sticky_per_key(
    repo_settings: Settings, stages: StageProcesses
) -> None:
    settings = repo_settings
    add_version(settings.stage.models_dir, "3")  # on disk, never loaded
    _command(settings, route, {"1": 90, "2": 10})  # before any worker starts
    stages.start_pipeline()
    features, _ = holdout()
    sender = RequestProducer(producer=make_producer(settings), topic=settings.topics.requests)
    keys = [f"customer-{i % 1500}" for i in range(6000)]
    for i, key in enumerate(keys):
        request = digits_request(features[i % len(features)], request_id=f"split-{i}")
        sender.send(request, partition_key=key)
    sender.send(digits_request(features[0], request_id="named-1", model_version="1"))
    sender.send(digits_request(features[0], request_id="named-3", model_version="3"))
    assert sender.flush() == 0

    results = {r.id: r for r in _results(settings, len(keys) + 1)}
    assert len(results) == len(keys) + 1 and results["named-1"].model_version == "1"
    seen: dict[str, set[str]] = defaultdict(set)
    for i, key in enumerate(keys):
        seen[key].add(results[f"split-{i}"].model_version)
    assert all(len(v) == 1 for v in seen.values()), "a key saw two versions"
    share = sum(results[f"split-{i}"].model_version == "2" for i in range(len(keys))) / len(keys)
    assert 0.07 <= share <= 0.13, share
    dead = read_topic(settings, settings.topics.dlq, count=1)
    assert [dict(m.headers() or [])["dlq.reason"] for m in dead] == [b"unknown_model"]
    print(f"split 90/10: version 2 served {share:.2%} of {len(keys)} requests")


def test_a_shadow_twins_every_result_on_its_own_topic_and_never_in_redis(
    repo_settings: Settings,
    stages: StageProcesses,
    redis_client: redis.Redis,
    capsys: pytest.CaptureFixture[str],
) -> None:
    settings = repo_settings
    _command(settings, shadow, "2")
    stages.start_pipeline()
    ids = [f"shadowed-{i}" for i in range(1000)]
    send_digits(settings, settings.topics.requests, ids)

    primaries = _results(settings, len(ids))
    twins = [
        RESULTS.decode(m.value())
        for m in read_topic(settings, settings.topics.shadow, count=len(ids))
    ]
    assert sorted(r.id for r in primaries) == sorted(ids) == sorted(r.id for r in twins)
    assert {r.model_version for r in primaries} == {"1"}
    assert {r.model_version for r in twins} == {"2"}
    read_topic(settings, settings.topics.stored, count=len(ids))  # persist is done with them
    keys = ResultKeys(settings.kafka.topic_prefix)
    stored = redis_client.mget([keys.key(settings.kafka.default_tenant, i) for i in ids])
    assert all(v is not None for v in stored)
    assert {RESULTS.decode(v).model_version for v in stored if v} == {"1"}

    capsys.readouterr()
    assert models_cli.compare(settings, "digits", "2", window_s=600) == 0
    report = capsys.readouterr().out
    assert "with a primary       1000 (primary versions 1: 1000)" in report
    assert "label agreement" in report
    print(report)

"""The control plane's state and the meaning of each command (pure functions)."""

from __future__ import annotations

from pathlib import Path

import pytest

from schemas import Codec
from schemas.control import (
    InvalidChange,
    ModelSettings,
    ModelState,
    configure,
    default_state,
    load,
    promote,
    rollback,
    route,
    shadow,
    unload,
)
from schemas.models import ModelCatalog, ModelSpec
from stages.fleet import BUCKETS, bucket_of, cumulative_routes
from tests.model_repo import digits_repository


@pytest.fixture()
def spec(tmp_path: Path) -> ModelSpec:
    return ModelCatalog(digits_repository(tmp_path, versions=("1", "2", "3"), real=False)).spec(
        "digits"
    )


def test_a_model_no_command_touched_serves_its_policy(spec: ModelSpec) -> None:
    state = default_state(spec)
    assert (state.loaded, state.routing, state.revision, state.shadow) == (
        ["1"],
        {"1": 100},
        0,
        None,
    )


def test_route_promote_and_rollback_keep_what_rollback_restores(spec: ModelSpec) -> None:
    state = route(default_state(spec), spec, {"1": 90, "2": 10}, now=5.0, who="ops")
    assert (state.routing, state.previous_routing, state.loaded) == (
        {"1": 90, "2": 10},
        {"1": 100},
        ["1", "2"],
    )
    assert (state.revision, state.updated_at, state.changed_by) == (1, 5.0, "ops")
    promoted = promote(state, spec, "2", now=6.0)
    assert (promoted.routing, promoted.previous_routing) == ({"2": 100}, {"1": 90, "2": 10})
    back = rollback(promoted, now=7.0)
    assert (back.routing, back.previous_routing, back.revision) == (
        {"1": 90, "2": 10},
        {"2": 100},
        3,
    )
    assert rollback(back, now=8.0).routing == {"2": 100}  # a second rollback undoes the first


def test_commands_that_cannot_apply_say_why(spec: ModelSpec) -> None:
    state = route(default_state(spec), spec, {"1": 50, "2": 50}, now=1.0)
    with pytest.raises(InvalidChange, match="still takes traffic"):
        unload(state, "2", now=2.0)
    with pytest.raises(InvalidChange, match=r"no version \['9'\]"):
        load(state, spec, "9", now=2.0)
    with pytest.raises(InvalidChange, match="positive weight"):
        route(state, spec, {"1": 0}, now=2.0)
    with pytest.raises(InvalidChange, match="no previous routing"):
        rollback(default_state(spec), now=2.0)
    shadowed = shadow(state, spec, "3", now=2.0)
    with pytest.raises(InvalidChange, match="is the shadow"):
        unload(load(shadowed, spec, "3", now=3.0), "3", now=3.0)
    assert shadowed.versions() == ["1", "2", "3"]  # the shadow is loaded too
    assert promote(shadowed, spec, "3", now=4.0).shadow is None  # promoted: no longer a shadow


def test_settings_merge_and_the_state_round_trips(spec: ModelSpec) -> None:
    state = configure(default_state(spec), ModelSettings(max_batch_size=64), now=1.0)
    state = configure(state, ModelSettings(max_queue_delay_ms=2.5), now=2.0)
    assert state.settings == ModelSettings(max_batch_size=64, max_queue_delay_ms=2.5)
    codec = Codec(ModelState)
    assert codec.decode(codec.encode(state)) == state


def test_routing_buckets_are_stable_and_cut_by_cumulative_weight() -> None:
    assert cumulative_routes({"1": 90, "2": 10}) == ((9000, "1"), (10000, "2"))
    assert cumulative_routes({"1": 1, "2": 2}) == ((3333, "1"), (10000, "2"))
    # A fixed value: the hash must be the same in every process, worker and release.
    assert bucket_of(b"customer-7") == bucket_of(b"customer-7") == 826
    buckets = [bucket_of(f"k{i}".encode()) for i in range(20_000)]
    assert all(0 <= b < BUCKETS for b in buckets)
    assert 0.09 < sum(b >= 9000 for b in buckets) / len(buckets) < 0.11

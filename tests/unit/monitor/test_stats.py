"""The window arithmetic: PSI, latency quantiles, adding observations, closing a window."""

from __future__ import annotations

import math

import pytest

from monitor.records import Observation, WindowState, decode_state, encode
from monitor.stats import (
    GROWTH,
    add,
    bucket,
    check_sizes,
    drift,
    label_shares,
    merge,
    parse_window,
    partials,
    population_stability_index,
    quantile,
    summarize,
    window_name,
)

TRAINING = {str(d): 0.1 for d in range(10)}


def result(label: str, *, score: float = 0.9, latency_s: float = 0.02) -> Observation:
    return Observation(
        kind="result", model="digits", version="1", at=100.0, label=label, score=score,
        latency_s=latency_s,
    )  # fmt: skip


def test_psi_of_identical_distributions_is_zero() -> None:
    assert population_stability_index(TRAINING, TRAINING) == 0.0
    # counts and shares are both normalised
    counts = {label: 37 for label in TRAINING}
    assert population_stability_index(counts, TRAINING) == pytest.approx(0.0)


def test_psi_matches_the_formula_on_a_small_case() -> None:
    actual, expected = {"a": 30, "b": 70}, {"a": 0.5, "b": 0.5}
    want = (0.3 - 0.5) * math.log(0.3 / 0.5) + (0.7 - 0.5) * math.log(0.7 / 0.5)
    assert population_stability_index(actual, expected) == pytest.approx(want)


def test_psi_of_a_single_label_is_far_above_the_alert_line() -> None:
    psi = population_stability_index({"7": 200}, TRAINING)
    # "7": (1 - 0.1) ln(1/0.1); each of the nine others: (1e-4 - 0.1) ln(1e-4/0.1)
    want = 0.9 * math.log(10) + 9 * (1e-4 - 0.1) * math.log(1e-4 / 0.1)
    assert psi == pytest.approx(want)
    assert psi > 0.2


def test_psi_counts_a_label_unknown_to_training_with_the_floor() -> None:
    psi = population_stability_index({"0": 90, "x": 10}, {"0": 1.0})
    assert math.isfinite(psi) and psi > 0.2


def test_psi_refuses_an_empty_distribution() -> None:
    with pytest.raises(ValueError):
        population_stability_index({}, TRAINING)
    with pytest.raises(ValueError):
        population_stability_index({"7": 1}, {"7": 0.0})


def test_drift_needs_a_training_distribution_and_enough_results() -> None:
    assert drift({"7": 49}, TRAINING, min_results=50) is None
    assert drift({"7": 50}, None, min_results=50) is None
    assert drift({"7": 50}, {}, min_results=50) is None
    assert drift({"7": 50}, TRAINING, min_results=50) == pytest.approx(
        population_stability_index({"7": 1}, TRAINING)
    )


def test_quantiles_of_the_log_histogram_are_within_the_bucket_error() -> None:
    values = [0.001 * (i + 1) for i in range(1000)]  # 1 ms .. 1 s, uniform
    histogram: dict[int, int] = {}
    for v in values:
        histogram[bucket(v)] = histogram.get(bucket(v), 0) + 1
    tolerance = math.sqrt(GROWTH) - 1
    p50, p99 = quantile(histogram, 0.5), quantile(histogram, 0.99)
    assert p50 is not None and abs(p50 / 0.5 - 1) <= tolerance
    assert p99 is not None and abs(p99 / 0.99 - 1) <= tolerance
    assert quantile({}, 0.5) is None


def test_a_latency_at_or_below_zero_counts_as_the_smallest_bucket() -> None:
    assert bucket(0.0) == bucket(-3.0) == bucket(1e-6)


def test_window_names_and_their_parsing_agree() -> None:
    assert [window_name(s) for s in (10, 60, 90, 300, 3600)] == ["10s", "1m", "90s", "5m", "1h"]
    for text, seconds in (("10s", 10), ("1m", 60), ("1h", 3600), ("45", 45)):
        assert parse_window(text) == seconds
    with pytest.raises(ValueError):
        parse_window("0s")
    with pytest.raises(ValueError):
        window_name(2.5)


def test_adding_observations_counts_each_kind() -> None:
    state = WindowState()
    for label in ("7", "7", "1"):
        add(state, result(label, score=0.8))
    add(state, Observation(kind="result", model="digits", version="1", at=1.0))  # no label
    add(state, Observation(kind="stored", model="digits", version="1", at=1.0, latency_s=0.1))
    for reason in ("expired", "expired", None):
        add(state, Observation(kind="dead_letter", model="digits", version="1", at=1.0,
                               reason=reason))  # fmt: skip
    assert state.results == 4 and state.stored == 1
    assert state.labels == {"7": 2, "1": 1}
    assert state.scored == 3 and state.score_sum == pytest.approx(2.4)
    assert sum(state.inferred_latency.values()) == 3 and sum(state.e2e_latency.values()) == 1
    assert state.dead_letters == {"expired": 2, "unknown": 1}


def test_the_state_survives_its_table_encoding() -> None:
    state = WindowState()
    add(state, result("3"))
    assert decode_state(encode(state)) == state
    assert decode_state(b"") == WindowState() == decode_state(None)


def test_a_closed_window_summarises_its_state() -> None:
    state = WindowState()
    for i in range(100):
        add(state, result("7" if i < 90 else "1", score=0.5 if i % 2 else 1.0, latency_s=0.02))
    closed = summarize(
        state, model="digits", version="1", size_s=60, start=600.0, training=TRAINING,
        min_results=50, closed_at=700.0,
    )  # fmt: skip
    assert (closed.window, closed.start, closed.end, closed.key) == ("1m", 600.0, 660.0,
                                                                      "digits/1/1m")  # fmt: skip
    assert closed.requests == 100 and closed.label_counts == {"1": 10, "7": 90}
    assert closed.label_shares["7"] == pytest.approx(0.9) and closed.label_shares["0"] == 0.0
    assert set(closed.label_shares) == set(TRAINING)
    assert closed.mean_score == pytest.approx(0.75)
    assert closed.inferred_p99_s == pytest.approx(0.02, rel=0.025)
    assert closed.e2e_p50_s is None and closed.stored == 0
    assert closed.drift_psi == pytest.approx(population_stability_index(state.labels, TRAINING))


def test_an_empty_window_has_no_scores() -> None:
    closed = summarize(
        WindowState(), model="m", version="v", size_s=10, start=0.0, training=None,
        min_results=1, closed_at=1.0,
    )  # fmt: skip
    assert closed.mean_score is None and closed.drift_psi is None and closed.label_shares == {}


def test_label_shares_list_trained_labels_a_window_lacks() -> None:
    assert label_shares({"a": 3, "b": 1}, {"c": 1.0}) == {"a": 0.75, "b": 0.25, "c": 0.0}
    assert label_shares({}, {"c": 1.0}) == {"c": 0.0}


def test_a_batch_counts_into_one_partial_per_version_and_smallest_window() -> None:
    def at(label: str, version: str, when: float) -> Observation:
        return Observation(kind="result", model="digits", version=version, at=when, label=label)

    batch = [at("7", "1", 100.0), at("7", "1", 109.9), at("1", "1", 110.0), at("3", "2", 101.0)]
    found = {(p.version, math.floor(p.at / 10)): p.state.labels for p in partials(batch, 10)}
    assert found == {("1", 10): {"7": 2}, ("1", 11): {"1": 1}, ("2", 10): {"3": 1}}


def test_merging_partials_equals_adding_every_observation() -> None:
    observations = [result(str(i % 3), score=i / 10, latency_s=0.01 * (i + 1)) for i in range(9)]
    observations.append(Observation(kind="stored", model="digits", version="1", at=100.0,
                                    latency_s=0.3))  # fmt: skip
    observations.append(Observation(kind="dead_letter", model="digits", version="1", at=100.0,
                                    reason="expired"))  # fmt: skip
    direct = WindowState()
    for seen in observations:
        add(direct, seen)
    merged = WindowState()
    for part in (observations[:4], observations[4:]):
        for partial in partials(part, 10):
            merge(merged, partial.state)
    assert merged.score_sum == pytest.approx(direct.score_sum)
    merged.score_sum = direct.score_sum
    assert merged == direct


def test_window_sizes_must_be_multiples_of_the_smallest() -> None:
    assert check_sizes([60, 10, 3600]) == 10
    for sizes in ([10, 15], [], [0, 10]):
        with pytest.raises(ValueError):
            check_sizes(sizes)

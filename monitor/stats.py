"""The window arithmetic, free of Kafka and faust: adding an observation to a window,
summarising a closed window, latency quantiles and the population stability index."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Final, TypeVar

from monitor.records import Observation, PartialWindow, WindowState, WindowStatsV1

# Latency histogram: bucket i holds values in [GROWTH**i, GROWTH**(i+1)); reporting the
# bucket's geometric middle is within sqrt(GROWTH) - 1 < 2.5 % of any value in it.
GROWTH: Final = 1.05
_LOG_GROWTH: Final = math.log(GROWTH)
_SMALLEST_S: Final = 1e-6  # a latency <= 0 (clocks apart) counts as 1 us
# PSI is undefined for an empty bin; an empty share counts as this instead (the usual choice,
# so one label never seen in a window adds a bounded amount rather than infinity).
PSI_FLOOR: Final = 1e-4
K = TypeVar("K", str, int)


def window_name(size_s: float) -> str:
    """``10`` -> ``10s``, ``60`` -> ``1m``, ``3600`` -> ``1h``: the ``window`` label."""
    seconds = int(size_s)
    if seconds != size_s or seconds <= 0:
        raise ValueError(f"window sizes are whole seconds, got {size_s}")
    for unit, length in (("h", 3600), ("m", 60)):
        if seconds % length == 0:
            return f"{seconds // length}{unit}"
    return f"{seconds}s"


def parse_window(text: str) -> int:
    """``10s``, ``1m``, ``1h`` or plain seconds -> seconds (inverse of :func:`window_name`)."""
    text = text.strip()
    units = {"s": 1, "m": 60, "h": 3600}
    number, factor = (text[:-1], units[text[-1]]) if text[-1:] in units else (text, 1)
    seconds = int(number) * factor
    if seconds <= 0:
        raise ValueError(f"a window must be positive: {text!r}")
    return seconds


def bucket(latency_s: float) -> int:
    return math.floor(math.log(max(latency_s, _SMALLEST_S)) / _LOG_GROWTH)


def quantile(histogram: Mapping[int, int], q: float) -> float | None:
    """The ``q`` quantile (nearest rank) of a :func:`bucket` histogram; None when empty."""
    total = sum(histogram.values())
    if total == 0:
        return None
    rank = max(1, math.ceil(q * total))
    seen = 0
    for index in sorted(histogram):
        seen += histogram[index]
        if seen >= rank:
            return float(GROWTH ** (index + 0.5))
    raise AssertionError("unreachable: the ranks add up to the total")


def population_stability_index(
    actual: Mapping[str, float], expected: Mapping[str, float], *, floor: float = PSI_FLOOR
) -> float:
    """PSI = sum over labels of (a - e) * ln(a / e), with a and e the label's share of
    ``actual`` and ``expected`` (counts or shares; each is normalised to sum 1).

    Labels present in only one of them count with a share of ``floor`` in the other. By the
    usual reading: < 0.1 no shift, 0.1-0.2 moderate, > 0.2 a significant shift.
    """
    actual_total, expected_total = sum(actual.values()), sum(expected.values())
    if actual_total <= 0 or expected_total <= 0:
        raise ValueError("PSI needs a non-empty actual and expected distribution")
    psi = 0.0
    for label in set(actual) | set(expected):
        a = max(actual.get(label, 0) / actual_total, floor)
        e = max(expected.get(label, 0) / expected_total, floor)
        psi += (a - e) * math.log(a / e)
    return psi


def _count(counts: dict[K, int], key: K) -> None:
    counts[key] = counts.get(key, 0) + 1


def add(state: WindowState, observation: Observation) -> None:
    """Count ``observation`` into ``state`` (in place)."""
    if observation.kind == "result":
        state.results += 1
        if observation.label is not None:
            _count(state.labels, observation.label)
        if observation.score is not None:
            state.score_sum += observation.score
            state.scored += 1
        if observation.latency_s is not None:
            _count(state.inferred_latency, bucket(observation.latency_s))
    elif observation.kind == "stored":
        state.stored += 1
        if observation.latency_s is not None:
            _count(state.e2e_latency, bucket(observation.latency_s))
    else:
        _count(state.dead_letters, observation.reason or "unknown")


def merge(state: WindowState, other: WindowState) -> None:
    """Add ``other``'s counts to ``state`` (in place)."""
    state.results += other.results
    state.stored += other.stored
    state.score_sum += other.score_sum
    state.scored += other.scored
    for mine, theirs in (
        (state.labels, other.labels),
        (state.dead_letters, other.dead_letters),
    ):
        for label, count in theirs.items():
            mine[label] = mine.get(label, 0) + count
    for histogram, more in (
        (state.inferred_latency, other.inferred_latency),
        (state.e2e_latency, other.e2e_latency),
    ):
        for index, count in more.items():
            histogram[index] = histogram.get(index, 0) + count


def partials(observations: Iterable[Observation], smallest_s: int) -> list[PartialWindow]:
    """Group a batch by model version and smallest window, counted. The window sizes must be
    multiples of ``smallest_s`` (:func:`check_sizes`): two records in the same smallest window
    are then in the same window of every size."""
    groups: dict[tuple[str, str, int], PartialWindow] = {}
    for seen in observations:
        key = (seen.model, seen.version, math.floor(seen.at / smallest_s))
        if key not in groups:
            groups[key] = PartialWindow(
                model=seen.model, version=seen.version, at=seen.at, state=WindowState()
            )
        add(groups[key].state, seen)
    return list(groups.values())


def check_sizes(sizes: Iterable[int]) -> int:
    """The smallest window size; ValueError unless every size is a multiple of it."""
    ordered = sorted(set(sizes))
    if not ordered or ordered[0] <= 0:
        raise ValueError("give at least one positive window size")
    if any(size % ordered[0] for size in ordered):
        raise ValueError(f"window sizes must be multiples of the smallest: {ordered}")
    return ordered[0]


def label_shares(counts: Mapping[str, int], training: Mapping[str, float]) -> dict[str, float]:
    """Each label's share of the window, for every label seen or trained on (0 when unseen,
    so that a gauge of a label that vanished drops to 0 instead of keeping its last value)."""
    total = sum(counts.values())
    labels = sorted(set(counts) | set(training))
    return {label: (counts.get(label, 0) / total if total else 0.0) for label in labels}


def drift(
    counts: Mapping[str, int], training: Mapping[str, float] | None, *, min_results: int
) -> float | None:
    """PSI of the window's labels against training; None without a training distribution or
    with fewer than ``min_results`` labelled results."""
    if not training or sum(counts.values()) < max(min_results, 1):
        return None
    return population_stability_index(counts, training)


def summarize(
    state: WindowState,
    *,
    model: str,
    version: str,
    size_s: int,
    start: float,
    training: Mapping[str, float] | None,
    min_results: int,
    closed_at: float,
) -> WindowStatsV1:
    """The published record of a closed window."""
    return WindowStatsV1(
        model=model,
        model_version=version,
        window=window_name(size_s),
        start=start,
        end=start + size_s,
        requests=state.results,
        stored=state.stored,
        label_counts=dict(sorted(state.labels.items())),
        label_shares=label_shares(state.labels, training or {}),
        mean_score=state.score_sum / state.scored if state.scored else None,
        inferred_p50_s=quantile(state.inferred_latency, 0.5),
        inferred_p99_s=quantile(state.inferred_latency, 0.99),
        e2e_p50_s=quantile(state.e2e_latency, 0.5),
        e2e_p99_s=quantile(state.e2e_latency, 0.99),
        dead_letters=dict(sorted(state.dead_letters.items())),
        drift_psi=drift(state.labels, training, min_results=min_results),
        closed_at=closed_at,
    )

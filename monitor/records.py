"""The monitor's messages: what it observes, what it keeps per window, what it publishes.

All three travel as MessagePack (msgspec), like the pipeline's own records.
"""

from __future__ import annotations

from typing import Final, Literal

import msgspec
from msgspec import Struct

STATS_SCHEMA: Final = "inference.stats/1"
UNKNOWN: Final = "unknown"  # model or version of a dead letter whose value does not say

ObservationKind = Literal["result", "stored", "dead_letter"]


class Observation(Struct, frozen=True, kw_only=True, array_like=True):
    """One pipeline record reduced to what the windows need.

    ``at`` (epoch seconds) places it in a window: the Kafka timestamp of the record it came
    from, i.e. when the pipeline wrote it (our producers' clocks, not the client's).
    ``latency_s``: ``created_at`` -> ``timings["inferred"]`` for a result, ``created_at`` ->
    ``stored_at`` for a stored notice (end to end).
    """

    kind: ObservationKind
    model: str
    version: str
    at: float
    label: str | None = None
    score: float | None = None
    latency_s: float | None = None
    reason: str | None = None


class WindowState(Struct, kw_only=True):
    """The running aggregate of one window of one model version (a faust table value).

    Latencies are kept as sparse log-bucket histograms (:func:`monitor.stats.bucket`), so the
    state stays small however many records a window holds.
    """

    results: int = 0
    stored: int = 0
    labels: dict[str, int] = msgspec.field(default_factory=dict)
    score_sum: float = 0.0
    scored: int = 0
    inferred_latency: dict[int, int] = msgspec.field(default_factory=dict)
    e2e_latency: dict[int, int] = msgspec.field(default_factory=dict)
    dead_letters: dict[str, int] = msgspec.field(default_factory=dict)


class PartialWindow(Struct, frozen=True, kw_only=True):
    """The observations of one batch that fall into the same smallest window of one model
    version, already counted: what the observing agent sends to the aggregating one, so a
    batch of a thousand records costs a few table updates rather than a thousand."""

    model: str
    version: str
    at: float  # of one of its records: every record in it shares every window with it
    state: WindowState


class WindowStatsV1(Struct, frozen=True, kw_only=True):
    """One closed window of one model version, as published on ``inference.stats``.

    Key ``<model>/<version>/<window>`` (the topic is compacted: the latest window of each size
    per version stays), header ``schema: inference.stats/1``. ``window`` names the size
    (``10s``, ``1m``); ``start``/``end`` are epoch seconds, end exclusive.

    ``requests``: results (``inference.results``); ``stored``: stored notices. Quantiles are
    ``None`` when the window has no such record; their relative error is below 2.5 %.
    ``drift_psi``: population stability index of ``label_counts`` against the training
    distribution in ``model.yaml``; ``None`` without one or with fewer results than the
    monitor's minimum (small samples make PSI noise).
    """

    model: str
    model_version: str
    window: str
    start: float
    end: float
    requests: int
    stored: int
    label_counts: dict[str, int]
    label_shares: dict[str, float]
    mean_score: float | None
    inferred_p50_s: float | None
    inferred_p99_s: float | None
    e2e_p50_s: float | None
    e2e_p99_s: float | None
    dead_letters: dict[str, int]
    drift_psi: float | None
    closed_at: float

    @property
    def key(self) -> str:
        return f"{self.model}/{self.model_version}/{self.window}"


_ENCODER = msgspec.msgpack.Encoder()
_OBSERVATION = msgspec.msgpack.Decoder(Observation)
_PARTIAL = msgspec.msgpack.Decoder(PartialWindow)
_STATE = msgspec.msgpack.Decoder(WindowState)
_STATS = msgspec.msgpack.Decoder(WindowStatsV1)


def encode(message: Observation | PartialWindow | WindowState | WindowStatsV1) -> bytes:
    return _ENCODER.encode(message)


def decode_observation(data: bytes) -> Observation:
    return _OBSERVATION.decode(data)


def decode_partial(data: bytes) -> PartialWindow:
    return _PARTIAL.decode(data)


def decode_state(data: bytes | None) -> WindowState:
    """The state in ``data``; an empty one for a window not seen yet (no or empty value)."""
    return _STATE.decode(data) if data else WindowState()


def decode_stats(data: bytes) -> WindowStatsV1:
    return _STATS.decode(data)

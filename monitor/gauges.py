"""The monitor's Prometheus metrics: the last closed window of each size per model version.

Every gauge carries ``model``, ``version`` and ``window`` (``10s``, ``1m``). A gauge keeps its
value until the next window of its series closes, so a version that stopped receiving traffic
keeps showing its last window; ``streaminfer_monitor_window_end_timestamp_seconds`` says how
old that is (the drift alert requires a recent one). A value the window cannot give (no
stored notice, too few results for drift) is NaN, which no comparison matches.
"""

from __future__ import annotations

import math
from typing import Final

from prometheus_client import CollectorRegistry, Counter, Gauge

from monitor.records import WindowStatsV1

WINDOW: Final = ("model", "version", "window")
NAMES: Final = {
    "drift": "streaminfer_monitor_drift_psi",
    "requests": "streaminfer_monitor_window_requests",
    "stored": "streaminfer_monitor_window_stored",
    "label_share": "streaminfer_monitor_label_share_ratio",
    "mean_score": "streaminfer_monitor_mean_score",
    "latency": "streaminfer_monitor_latency_seconds",
    "dead_letters": "streaminfer_monitor_window_dead_letters",
    "end": "streaminfer_monitor_window_end_timestamp_seconds",
    "closed": "streaminfer_monitor_windows_closed_total",
    "observed": "streaminfer_monitor_records_total",
}


def _nan(value: float | None) -> float:
    return math.nan if value is None else value


class MonitorGauges:
    """Sets the gauges from each closed window; counts what the monitor reads."""

    def __init__(self, registry: CollectorRegistry) -> None:
        def gauge(key: str, doc: str, *extra: str) -> Gauge:
            return Gauge(NAMES[key], doc, [*WINDOW, *extra], registry=registry)

        self.drift = gauge("drift", "PSI of the window's labels against the training ones")
        self.requests = gauge("requests", "results in the window")
        self.stored = gauge("stored", "stored notices in the window")
        self.label_share = gauge("label_share", "share of the window's results", "label")
        self.mean_score = gauge("mean_score", "mean score of the predicted labels")
        self.latency = gauge(
            "latency",
            "latency quantile: path=inferred (created_at -> inferred), e2e (-> stored)",
            "path",
            "quantile",
        )
        self.dead_letters = gauge("dead_letters", "dead letters in the window", "reason")
        self.end = gauge("end", "end of the last closed window (epoch seconds)")
        self.closed = Counter(NAMES["closed"], "windows closed", WINDOW, registry=registry)
        self.observed = Counter(
            NAMES["observed"],
            "records read, by topic kind and outcome (observed, unreadable)",
            ["kind", "outcome"],
            registry=registry,
        )
        self._reasons: dict[tuple[str, str, str], set[str]] = {}

    def publish(self, stats: WindowStatsV1) -> None:
        labels = (stats.model, stats.model_version, stats.window)
        self.drift.labels(*labels).set(_nan(stats.drift_psi))
        self.requests.labels(*labels).set(stats.requests)
        self.stored.labels(*labels).set(stats.stored)
        self.mean_score.labels(*labels).set(_nan(stats.mean_score))
        for label, share in stats.label_shares.items():
            self.label_share.labels(*labels, label).set(share)
        quantiles = {
            ("inferred", "0.5"): stats.inferred_p50_s,
            ("inferred", "0.99"): stats.inferred_p99_s,
            ("e2e", "0.5"): stats.e2e_p50_s,
            ("e2e", "0.99"): stats.e2e_p99_s,
        }
        for (path, q), value in quantiles.items():
            self.latency.labels(*labels, path, q).set(_nan(value))
        # A reason of an earlier window that this one lacks drops to 0 (not its last count).
        reasons = self._reasons.setdefault(labels, set())
        reasons.update(stats.dead_letters)
        for reason in reasons:
            self.dead_letters.labels(*labels, reason).set(stats.dead_letters.get(reason, 0))
        self.end.labels(*labels).set(stats.end)
        self.closed.labels(*labels).inc()

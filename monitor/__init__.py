"""The streaming monitor (``streaminfer monitor``): a faust-streaming app that watches
``inference.results``, ``inference.stored`` and ``inference.dlq`` and keeps tumbling windows
(10 s and 1 min by default) per model and version: requests, label distribution, mean score,
latency quantiles, dead letters by reason, and the drift of the label distribution from the
training one (population stability index).

Each closed window goes to the compacted ``inference.stats`` topic (:class:`WindowStatsV1`,
MessagePack) and to Prometheus gauges (``streaminfer_monitor_*``).

Modules: :mod:`monitor.stats` (the window arithmetic, pure), :mod:`monitor.records` (the
messages), :mod:`monitor.observe` (pipeline records -> observations), :mod:`monitor.training`
(training distributions from ``model.yaml``), :mod:`monitor.gauges` (Prometheus),
:mod:`monitor.app` (the faust wiring; the only module that imports faust).
"""

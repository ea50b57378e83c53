"""Pipeline records -> observations; training distributions; the gauges of a closed window."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import msgspec
import numpy as np
import pytest
import yaml
from prometheus_client import CollectorRegistry

from monitor.gauges import NAMES, MonitorGauges
from monitor.observe import header, observe
from monitor.records import UNKNOWN, Observation, WindowState, decode_observation, encode
from monitor.stats import add, summarize
from monitor.training import TrainingDistributions, distributions, parse_distribution
from schemas import Codec, ResultV1, StoredV1, tensor_from_array
from schemas.headers import Headers
from schemas.topics import Topics
from tests.helpers import MODELS

TOPICS = Topics(prefix="p.")


RESULT = ResultV1(
    id="r1",
    model="digits",
    model_version="1",
    status="ok",
    outputs={"label": tensor_from_array(np.array(7, dtype=np.int64))},
    created_at=100.0,
    label="7",
    scores={"7": 0.8, "1": 0.2},
    timings={"validated": 100.01, "inferred": 100.05},
)


def result_bytes(**changes: Any) -> bytes:
    return Codec(ResultV1).encode(msgspec.structs.replace(RESULT, **changes))


def test_a_result_becomes_its_label_score_and_latency() -> None:
    seen = observe(TOPICS, topic=TOPICS.results, value=result_bytes(), headers=None, at=101.0)
    assert seen is not None
    assert (seen.kind, seen.model, seen.version, seen.at) == ("result", "digits", "1", 101.0)
    assert seen.label == "7" and seen.score == 0.8
    assert seen.latency_s == pytest.approx(0.05)
    assert decode_observation(encode(seen)) == seen


def test_a_result_without_label_or_timings_still_counts() -> None:
    value = result_bytes(label=None, scores={"a": 0.3, "b": 0.6}, timings={})
    seen = observe(TOPICS, topic=TOPICS.results, value=value, headers=None, at=1.0)
    assert seen is not None and seen.label is None
    assert seen.score == 0.6 and seen.latency_s is None


def test_a_stored_notice_carries_the_end_to_end_latency() -> None:
    stored = StoredV1(
        id="r1", model="digits", model_version="2", key="result:r1", created_at=10.0,
        stored_at=10.25, label="7",
    )  # fmt: skip
    value = Codec(StoredV1).encode(stored)
    seen = observe(TOPICS, topic=TOPICS.stored, value=value, headers=[], at=11.0)
    assert seen is not None and (seen.kind, seen.version) == ("stored", "2")
    assert seen.latency_s == pytest.approx(0.25)


@pytest.mark.parametrize("value", [b"", b"\xc1", b"not msgpack", msgspec.msgpack.encode([1])])
def test_unreadable_results_are_skipped_not_raised(value: bytes) -> None:
    for topic in (TOPICS.results, TOPICS.stored):
        assert observe(TOPICS, topic=topic, value=value, headers=None, at=1.0) is None
    assert observe(TOPICS, topic=TOPICS.results, value=None, headers=None, at=1.0) is None
    assert observe(TOPICS, topic="p.other", value=result_bytes(), headers=None, at=1.0) is None


def test_a_dead_letter_counts_by_reason_and_names_its_model_when_it_can() -> None:
    request = msgspec.msgpack.encode({"id": "x", "model": "digits", "inputs": {}})
    headers = [(Headers.DLQ_STAGE, b"validate"), (Headers.DLQ_REASON, b"invalid_input")]
    seen = observe(TOPICS, topic=TOPICS.dlq, value=request, headers=headers, at=5.0)
    assert seen is not None
    assert (seen.kind, seen.model, seen.version, seen.reason) == (
        "dead_letter", "digits", UNKNOWN, "invalid_input",
    )  # fmt: skip
    for garbage in (None, b"", b"\xc1\xc1", msgspec.msgpack.encode({"model": 5})):
        seen = observe(TOPICS, topic=TOPICS.dlq, value=garbage, headers={}, at=5.0)
        assert seen is not None and (seen.model, seen.reason) == (UNKNOWN, UNKNOWN)


def test_headers_are_read_from_pairs_or_a_mapping() -> None:
    assert header([("a", b"1"), ("a", b"2")], "a") == "1"
    assert header({"a": b"\xff"}, "a") == "\ufffd"
    assert header([("a", None)], "a") is None and header(None, "a") is None


def test_the_digits_model_records_its_training_distribution() -> None:
    training = TrainingDistributions(MODELS)
    shares = training.get("digits", "1")
    assert shares is not None and set(shares) == {str(d) for d in range(10)}
    assert sum(shares.values()) == pytest.approx(1.0, abs=1e-3)
    assert training.knows("digits") and training.knows("digits", "1")
    for name in ("nope", "../models", "/etc", "digits/1"):
        assert not training.knows(name)
    assert not training.knows("digits", "../digits")
    assert training.get("nope", "1") is None and training.get("../x", "1") is None


def test_a_version_may_have_its_own_distribution(tmp_path: Path) -> None:
    contract = {
        "training_label_distribution": {0: 1, 1: 3},
        "versions": {"2": {"training_label_distribution": {"a": 1.0}}, "3": {"file": "m"}},
    }
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "model.yaml").write_text(yaml.safe_dump(contract))
    training = TrainingDistributions(tmp_path)
    assert training.get("m", "2") == {"a": 1.0}
    assert training.get("m", "3") == {"0": 1.0, "1": 3.0}
    assert distributions({"versions": "x"}) == {}


@pytest.mark.parametrize("raw", [None, [], {"a": -1}, {"a": 0}, {"a": "x"}, {"a": math.inf}])
def test_an_unusable_distribution_is_ignored(raw: object) -> None:
    assert parse_distribution(raw) is None


def test_a_closed_window_sets_every_gauge_and_clears_vanished_reasons() -> None:
    registry = CollectorRegistry()
    gauges = MonitorGauges(registry)
    state = WindowState()
    for _ in range(60):
        add(state, Observation(kind="result", model="digits", version="1", at=1.0, label="7"))
    state.dead_letters = {"expired": 3}
    training = {str(d): 0.1 for d in range(10)}
    first = summarize(state, model="digits", version="1", size_s=60, start=0.0,
                      training=training, min_results=50, closed_at=61.0)  # fmt: skip
    gauges.publish(first)
    labels = {"model": "digits", "version": "1", "window": "1m"}
    value = registry.get_sample_value
    assert (value(NAMES["drift"], labels) or 0) > 0.2
    assert value(NAMES["requests"], labels) == 60
    assert value(NAMES["label_share"], {**labels, "label": "7"}) == 1.0
    assert value(NAMES["label_share"], {**labels, "label": "3"}) == 0.0
    assert value(NAMES["end"], labels) == 60.0
    assert value(NAMES["dead_letters"], {**labels, "reason": "expired"}) == 3
    e2e_p99 = value(NAMES["latency"], {**labels, "path": "e2e", "quantile": "0.99"})
    assert e2e_p99 is not None and math.isnan(e2e_p99)  # no stored notice in the window

    quiet = summarize(WindowState(), model="digits", version="1", size_s=60, start=60.0,
                      training=training, min_results=50, closed_at=121.0)  # fmt: skip
    gauges.publish(quiet)
    assert value(NAMES["dead_letters"], {**labels, "reason": "expired"}) == 0
    drift = value(NAMES["drift"], labels)
    assert drift is not None and math.isnan(drift)  # too few results to score
    assert value(NAMES["closed"], labels) == 2

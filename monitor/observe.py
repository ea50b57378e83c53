"""Pipeline records -> :class:`Observation`: decoding a result, a stored notice or a dead letter.

A record the monitor cannot read is not an error of the monitor's: :func:`observe` returns
``None`` for it (the caller counts those) and never raises on a record's content.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import msgspec

from monitor.records import UNKNOWN, Observation
from schemas.codec import Codec, DecodeError
from schemas.headers import Headers
from schemas.messages import ResultV1, StoredV1
from schemas.topics import Topics

RawHeaders = Mapping[str, bytes | None] | Iterable[tuple[str, bytes | None]] | None

_RESULTS = Codec(ResultV1)
_STORED = Codec(StoredV1)


class _Named(msgspec.Struct):
    """The two fields of a dead letter's original request (or result) that name its model."""

    model: str = UNKNOWN
    model_version: str | None = None


_NAMED = msgspec.msgpack.Decoder(_Named)


def from_result(value: bytes, at: float) -> Observation | None:
    try:
        result = _RESULTS.decode(value)
    except DecodeError:
        return None
    inferred = result.timings.get("inferred")
    return Observation(
        kind="result",
        model=result.model,
        version=result.model_version,
        at=at,
        label=result.label,
        score=_score(result),
        latency_s=None if inferred is None else inferred - result.created_at,
    )


def _score(result: ResultV1) -> float | None:
    """The predicted label's score (the model's confidence), else the highest score."""
    if not result.scores:
        return None
    if result.label is not None and result.label in result.scores:
        return result.scores[result.label]
    return max(result.scores.values())


def from_stored(value: bytes, at: float) -> Observation | None:
    try:
        stored = _STORED.decode(value)
    except DecodeError:
        return None
    return Observation(
        kind="stored",
        model=stored.model,
        version=stored.model_version,
        at=at,
        latency_s=stored.stored_at - stored.created_at,
    )


def from_dead_letter(value: bytes | None, headers: RawHeaders, at: float) -> Observation:
    """A dead letter always counts (by its ``dlq.reason``); its model and version come from
    the original value when that still decodes, else they are ``unknown``."""
    reason = header(headers, Headers.DLQ_REASON) or UNKNOWN
    named = _named(value)
    return Observation(
        kind="dead_letter",
        model=named.model,
        version=named.model_version or UNKNOWN,
        at=at,
        reason=reason,
    )


def _named(value: bytes | None) -> _Named:
    if not value:
        return _Named()
    try:
        return _NAMED.decode(value)
    except Exception:  # any bytes at all may be here: garbage, a prefix (dlq.truncated)...
        return _Named()


def header(headers: RawHeaders, name: str) -> str | None:
    """The value of header ``name`` as text (the first one), from a mapping or from pairs."""
    if headers is None:
        return None
    pairs = headers.items() if isinstance(headers, Mapping) else headers
    for key, value in pairs:
        if key == name and value is not None:
            return value.decode("utf-8", "replace")
    return None


def observe(
    topics: Topics, *, topic: str, value: bytes | None, headers: RawHeaders, at: float
) -> Observation | None:
    """The observation of one record of ``topic`` (one of results, stored, dlq)."""
    if topic == topics.dlq:
        return from_dead_letter(value, headers, at)
    if value is None:
        return None
    if topic == topics.results:
        return from_result(value, at)
    if topic == topics.stored:
        return from_stored(value, at)
    return None

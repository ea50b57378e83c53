"""Per-record isolation: a record that breaks a batch is dead-lettered alone, the rest flow.

The runner (:mod:`stages.runtime`, where the contract is documented) calls
:func:`process_within_limit` on every batch: a stage exception it did not foresee becomes a
``stage_error`` dead letter for the record that raised, and an output larger than the
producer's maximum a ``too_large`` dead letter for the record it came from.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING

from stages.errors import SinkUnavailable
from stages.records import BatchOutcome, Record, Rejection, wire_size
from stages.tracing import record_in_hand

if TYPE_CHECKING:
    from stages.runtime import Stage

log = logging.getLogger(__name__)


def process_isolating(stage: Stage, batch: Sequence[Record]) -> BatchOutcome:
    """``stage.process(batch)``; if it raises anything but :class:`SinkUnavailable`, replay
    the batch one record at a time so only the records that raise are dead-lettered."""
    try:
        return stage.process(batch)
    except SinkUnavailable:
        raise
    except Exception:
        log.exception("%s: batch of %d raised; isolating records", stage.name, len(batch))
    outcome = BatchOutcome.empty()
    for record in batch:
        outcome.extend(_process_one(stage, record))
    return outcome


def _process_one(stage: Stage, record: Record) -> BatchOutcome:
    try:
        with record_in_hand(record):  # logs name this record's trace id
            return stage.process([record])
    except SinkUnavailable:
        raise
    except Exception as exc:
        detail = f"{type(exc).__name__}: {exc}"
        return BatchOutcome(outputs=[], rejected=[Rejection(record, "stage_error", detail)])


def process_within_limit(stage: Stage, batch: Sequence[Record], max_bytes: int) -> BatchOutcome:
    """:func:`process_isolating`, then: if an output would exceed ``max_bytes``, replay the
    batch one record at a time (outputs do not say which record they came from) and
    dead-letter as ``too_large`` each record with an output over the limit."""
    outcome = process_isolating(stage, batch)
    if all(wire_size(o) <= max_bytes for o in outcome.outputs):
        return outcome
    log.warning("%s: an output exceeds %d bytes; isolating records", stage.name, max_bytes)
    fitted = BatchOutcome.empty()
    for record in batch:
        alone = _process_one(stage, record)
        sizes = [wire_size(o) for o in alone.outputs]
        if sizes and max(sizes) > max_bytes:
            detail = f"output of {max(sizes)} bytes exceeds the limit of {max_bytes} bytes"
            alone = BatchOutcome(outputs=[], rejected=[Rejection(record, "too_large", detail)])
        fitted.extend(alone)
    return fitted

"""What backfill, replay and export take from the deployment, as plain values and factories.

``streaminfer.wiring.backfill_context`` builds one from the settings; nothing in ``backfill``
reads the environment or imports the layer above it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from confluent_kafka import Consumer, Producer

from schemas import Topics


@dataclass(frozen=True, slots=True, kw_only=True)
class BackfillContext:
    """Topics, directories, limits and the Kafka clients of one backfill command."""

    topics: Topics
    models_dir: Path  # model contracts: which inputs a row maps to
    checkpoint_dir: Path
    batch_rows: int  # rows per file read batch
    max_row_bytes: int  # a longer CSV record, JSON line or Parquet value is a reject
    message_max_bytes: int  # the producers' record limit; requests keep the pipeline's margin
    checkpoint_interval_s: float
    delivery_timeout_s: float  # how long the producer tries to deliver a record
    new_producer: Callable[[], Producer]  # idempotent, acks=all
    new_reader: Callable[[], Consumer]  # for bounded reads; its group never commits

"""Builds what the backfill commands take from :class:`Settings` (``backfill`` never reads
the settings itself). Kept apart from :mod:`streaminfer.wiring` so that a backfill imports
no stage, hence no ONNX Runtime."""

from __future__ import annotations

import uuid

from confluent_kafka import Consumer

from backfill.context import BackfillContext
from streaminfer.kafka import make_consumer, make_producer
from streaminfer.settings import Settings


def range_reader(settings: Settings) -> Consumer:
    """A consumer for bounded reads (``assign``, never ``subscribe``): its group id is never
    used to commit."""
    group = f"{settings.kafka.topic_prefix}streaminfer.reader.{uuid.uuid4().hex}"
    return make_consumer(settings, group_id=group)


def backfill_context(settings: Settings) -> BackfillContext:
    """Topics, directories, limits and client factories of ``backfill``/``replay``/``export``."""
    return BackfillContext(
        topics=settings.topics,
        models_dir=settings.stage.models_dir,
        checkpoint_dir=settings.backfill.checkpoint_dir or settings.home / "backfills",
        batch_rows=settings.backfill.batch_rows,
        max_row_bytes=settings.backfill.max_row_bytes,
        message_max_bytes=settings.kafka.message_max_bytes,
        checkpoint_interval_s=settings.backfill.checkpoint_interval_s,
        delivery_timeout_s=settings.kafka.delivery_timeout_s,
        new_producer=lambda: make_producer(settings),
        new_reader=lambda: range_reader(settings),
    )

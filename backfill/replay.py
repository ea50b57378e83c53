"""Replay: re-send stored requests from ``inference.requests`` as a new backfill.

The window is found with Kafka's time index (``offsets_for_times``): per partition, from the
first record whose timestamp is at or after ``--from`` up to (excluding) the first at or after
``--to`` (or the partition's end when the replay starts). Each partition is one source; its
rows are offsets. A request for another model is skipped; a record that is not a request is
a reject. Each replayed request gets the id ``<replay id>:<original id>``, no deadline, a
fresh ``created_at``, the replay's model version, and the original attributes plus
``source=backfill``, ``backfill_id``, ``original_id``, ``file=kafka:<topic>:<partition>`` and
``row=<offset>``. It keeps the original record's tenant header, so its result lands under the
original tenant; a record whose headers cannot be read is a reject (its tenant is unknown).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from datetime import UTC, datetime

from confluent_kafka import Consumer, Message

from backfill.checkpoint import SourceState
from backfill.convert import Reject
from backfill.engine import Item, TenantRequest
from backfill.ids import replay_request_id
from backfill.topics import PartitionRange
from kafkaio.dead_letters import header_map
from kafkaio.offsets import end_offsets, offsets_at
from schemas import Codec, DecodeError, Headers, RequestV1


def parse_timestamp(text: str) -> int:
    """Epoch milliseconds from ISO 8601 (no timezone = UTC) or epoch seconds."""
    try:
        return int(float(text) * 1000)
    except ValueError:
        pass
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise ValueError(
            f"{text!r} is not a time: use ISO 8601 (2024-05-01T12:00:00Z) or epoch seconds"
        ) from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return int(moment.timestamp() * 1000)


def window_sources(
    consumer: Consumer, topic: str, from_ms: int, to_ms: int | None
) -> list[SourceState]:
    """One source per partition holding records in the window."""
    starts = offsets_at(consumer, topic, from_ms)
    ends = end_offsets(consumer, topic) if to_ms is None else offsets_at(consumer, topic, to_ms)
    return [
        SourceState(
            name=f"kafka:{topic}:{p}",
            kind="partition",
            key=str(p),
            format="kafka",
            fingerprint=f"{starts[p]}-{ends[p]}",
            first_row=starts[p],
            last_row=starts[p] - 1,  # nothing done yet; the default 0 would skip offset 0
            end_row=ends[p],
            estimated_rows=ends[p] - starts[p],
        )
        for p in sorted(starts)
        if starts[p] < ends.get(p, 0)
    ]


class ReplaySource:
    """One partition's window, as requests for ``model`` at ``version``."""

    def __init__(
        self,
        *,
        consumer: Consumer,
        topic: str,
        state: SourceState,
        replay_id: str,
        model: str,
        version: str | None,
    ) -> None:
        self.state = state
        self._consumer = consumer
        self._topic = topic
        self._replay_id = replay_id
        self._model = model
        self._version = version
        self._codec = Codec(RequestV1)

    def items(self, *, after_row: int) -> Iterator[Item]:
        partition = int(self.state.key)
        end = self.state.end_row if self.state.end_row is not None else after_row + 1
        window = PartitionRange(
            self._consumer, self._topic, {partition: after_row + 1}, {partition: end}
        )
        for batch in window.batches():
            for message in batch:
                yield message.offset() or 0, self._item(message)

    def _item(self, message: Message) -> RequestV1 | TenantRequest | Reject | None:
        offset = message.offset() or 0
        try:
            original = self._codec.decode(message.value() or b"")
        except DecodeError as exc:
            return Reject(offset, "malformed", f"not an inference.request/1: {exc}")
        try:
            message.headers()  # raises on a header name that is not UTF-8
        except Exception as exc:  # header_map() would read them as no headers, tenant lost
            return Reject(offset, "malformed", f"its headers cannot be read: {exc}")
        if original.model != self._model:
            return None
        replayed = self._replayed(original, offset)
        tenant = header_map(message).get(Headers.TENANT)
        return TenantRequest(replayed, tenant) if tenant else replayed

    def _replayed(self, original: RequestV1, offset: int) -> RequestV1:
        return RequestV1(
            id=replay_request_id(self._replay_id, original.id),
            model=self._model,
            model_version=self._version,
            inputs=original.inputs,
            created_at=time.time(),
            attributes={
                **original.attributes,
                "source": "backfill",
                "backfill_id": self._replay_id,
                "original_id": original.id,
                "file": self.state.name,
                "row": str(offset),
            },
        )

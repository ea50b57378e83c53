"""Tells predict waiters that their request was dead-lettered, without touching the stages.

Each ingest process reads ``inference.dlq`` with a consumer group of its own (every process
must see every dead letter, since only it knows its waiters), starting at the records written
since the process started (``offsets_for_times``), so a request dead-lettered before the
consumer's partitions were assigned is not missed. The request id comes from the dead
letter's value (the original request, untouched) or, when that is not a request, its key.
"""

from __future__ import annotations

import logging
import os
import threading
import time
import uuid
from collections.abc import Callable

from confluent_kafka import Consumer, Message, TopicPartition

from ingest.waiters import DeadLettered
from kafkaio.dead_letters import read_dead_letter

log = logging.getLogger(__name__)

OnDeadLetter = Callable[[str, DeadLettered], None]


def dead_letter_of(message: Message) -> tuple[str, DeadLettered] | None:
    """The request id and DLQ headers of a dead-letter record (None if it names no id).
    Never raises, whatever the record holds (:func:`kafkaio.dead_letters.read_dead_letter`)."""
    letter = read_dead_letter(message)
    if letter.request_id is None:
        return None
    outcome = DeadLettered(
        reason=letter.reason,
        message=letter.error,
        stage=letter.stage,
        # The original request's headers travel with it: its tenant settles only its waiters.
        tenant=letter.tenant,
    )
    return letter.request_id, outcome


class DlqWatcher:
    """Background thread: for every dead letter whose id ``wanted(id)``, ``notify(id, dl)``.

    ``notify`` is called from the watcher thread; hand it on to the event loop yourself.
    """

    def __init__(
        self,
        *,
        consumer_factory: Callable[[], Consumer],
        topic: str,
        wanted: Callable[[str], bool],
        notify: OnDeadLetter,
    ) -> None:
        self._consumer_factory = consumer_factory
        self._topic = topic
        self._wanted = wanted
        self._notify = notify
        self._since_ms = int(time.time() * 1000)
        self._stop = threading.Event()
        self.assigned = threading.Event()
        self._thread = threading.Thread(target=self._run, name="dlq-watcher", daemon=True)

    @staticmethod
    def group_id(prefix: str) -> str:
        """One group per process: a shared group would split the dead letters among them."""
        return f"{prefix}streaminfer.ingest.dlq.{os.getpid()}.{uuid.uuid4().hex[:8]}"

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=10)

    def _run(self) -> None:
        consumer = self._consumer_factory()
        consumer.subscribe([self._topic], on_assign=self._on_assign)
        try:
            while not self._stop.is_set():
                for message in consumer.consume(500, timeout=0.2):
                    if message.error() is None:
                        self._handle(message)
        finally:
            consumer.close()

    def _on_assign(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        wanted = [TopicPartition(p.topic, p.partition, self._since_ms) for p in partitions]
        try:
            positions = consumer.offsets_for_times(wanted, timeout=10)
        except Exception as exc:  # fall back to the end: only what comes from now on
            log.warning("dlq watcher: offsets_for_times failed (%r); reading from the end", exc)
            positions = [TopicPartition(p.topic, p.partition, -1) for p in partitions]
        consumer.assign(positions)
        self.assigned.set()

    def _handle(self, message: Message) -> None:
        found = dead_letter_of(message)
        if found is None or not self._wanted(found[0]):
            return
        try:
            self._notify(*found)
        except Exception:  # one waiter's failure must not end the thread for every other
            log.exception("dlq watcher: notifying the waiter of %r failed", found[0])

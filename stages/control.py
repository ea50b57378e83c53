"""The control plane's reader and writer: each model's desired state on ``inference.models``.

Every validate and infer worker runs a :class:`ControlPlane`: its own consumer (no group: it
assigns every partition and reads from the beginning, so it never joins or rebalances
anything), polled by a background thread for as long as the worker runs. A worker that
starts later reads the same records, so it converges to the same state; :meth:`running`
returns only once the reader has caught up with what the topic held when it started, so a
worker never serves a batch under a routing older than the one in force when it started.

The topic is compacted (the latest state per model survives) and has one partition, so a
model's records are read in the order they were written. The CLI writes it with
:func:`publish_state` after reading the current state with :func:`read_states`.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Final

from confluent_kafka import (
    OFFSET_BEGINNING,
    Consumer,
    KafkaException,
    Message,
    Producer,
    TopicPartition,
)

from kafkaio.offsets import end_offsets, partitions
from schemas import Codec, DecodeError, Headers
from schemas.control import ModelState, default_state
from schemas.headers import HeaderList
from schemas.messages import SCHEMA_NAMES
from schemas.models import ModelCatalog, ModelSpec, UnknownModel

log = logging.getLogger(__name__)

STATE_SCHEMA: Final = SCHEMA_NAMES[ModelState]
_STATES: Final = Codec(ModelState)
_POLL_S: Final = 0.05
_RETRY_TOPIC_S: Final = 2.0  # how often a reader looks again for a topic that is missing

Listener = Callable[[str], None]


def decode_record(message: Message) -> tuple[str, ModelState | None] | None:
    """The model a record of the topic concerns and its new state (None: a tombstone, back
    to the repository's defaults); None when the record is not a state (it is logged and
    ignored: one bad write must not stop every worker)."""
    key = message.key()
    value = message.value()
    if value is None:
        return None if key is None else (key.decode(errors="replace"), None)
    try:
        state = _STATES.decode(value)
    except (DecodeError, RecursionError) as exc:
        log.error("control: ignoring a record that is not a model state: %s", exc)
        return None
    return state.model, state


class ControlPlane:
    """The latest :class:`ModelState` of every model, read in a background thread.

    ``consumer_factory`` builds the reader's consumer (any group id: it never subscribes or
    commits). Listeners are called in the reader thread with the model's name after each
    change; they must be quick (the fleet only wakes its loader).
    """

    def __init__(
        self,
        *,
        consumer_factory: Callable[[], Consumer],
        topic: str,
        catch_up_timeout_s: float = 30.0,
    ) -> None:
        self._consumer_factory = consumer_factory
        self._topic = topic
        self._catch_up_timeout_s = catch_up_timeout_s
        self._states: dict[str, ModelState] = {}
        self._listeners: list[Listener] = []
        self._caught_up = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def subscribe(self, listener: Listener) -> None:
        self._listeners.append(listener)

    def state(self, model: str) -> ModelState | None:
        return self._states.get(model)

    def models(self) -> list[str]:
        return sorted(self._states)

    def loaded_versions(self, spec: ModelSpec) -> list[str]:
        """The versions workers keep loaded for ``spec``: its state's, or its policy's."""
        return (self.state(spec.name) or default_state(spec)).versions()

    @contextmanager
    def running(self) -> Iterator[ControlPlane]:
        """Read in the background while inside; returns once caught up (or after
        ``catch_up_timeout_s``, with a warning: a broker that is down must not keep the
        worker from starting on the repository's defaults)."""
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="control-plane", daemon=True)
        self._thread.start()
        if not self._caught_up.wait(self._catch_up_timeout_s):
            log.warning(
                "control: %s not read to its end within %.0fs; serving what was read so far",
                self._topic,
                self._catch_up_timeout_s,
            )
        try:
            yield self
        finally:
            self._stop.set()
            self._thread.join(timeout=10)

    def _run(self) -> None:
        consumer = self._consumer_factory()
        try:
            ends = self._assign(consumer)
            while not self._stop.is_set():
                if ends is None:  # the topic does not exist (yet)
                    self._stop.wait(_RETRY_TOPIC_S)
                    ends = self._assign(consumer)
                    continue
                self._poll(consumer)
                if not self._caught_up.is_set() and _reached(consumer, self._topic, ends):
                    log.info("control: read %s (%d models)", self._topic, len(self._states))
                    self._caught_up.set()
        except Exception:
            log.exception("control: the reader stopped; workers keep the last state read")
            self._caught_up.set()
        finally:
            consumer.close()

    def _assign(self, consumer: Consumer) -> dict[int, int] | None:
        """Assign every partition from the beginning; their end offsets now (what to read
        before the state counts as current). None when the topic does not exist."""
        numbers = partitions(consumer, self._topic)
        if not numbers:
            log.warning("control: topic %s does not exist; using the repository", self._topic)
            self._caught_up.set()
            return None
        ends = _end_offsets(consumer, self._topic, timeout_s=self._catch_up_timeout_s)
        consumer.assign([TopicPartition(self._topic, p, OFFSET_BEGINNING) for p in numbers])
        return ends

    def _poll(self, consumer: Consumer) -> None:
        message = consumer.poll(_POLL_S)
        if message is None:
            return
        if message.error() is not None:
            log.warning("control: consumer error: %s", message.error())
            return
        decoded = decode_record(message)
        if decoded is not None:
            self.apply(*decoded)

    def apply(self, model: str, state: ModelState | None) -> None:
        """Take ``state`` as ``model``'s current one (None: its repository defaults) and tell
        the listeners. Called by the reader thread; tests call it directly."""
        if state is None:
            self._states.pop(model, None)
        else:
            self._states[model] = state
        summary = "repository defaults" if state is None else _summary(state)
        log.info("control: %s -> %s", model, summary)
        for listener in self._listeners:
            listener(model)


def _end_offsets(consumer: Consumer, topic: str, *, timeout_s: float) -> dict[int, int]:
    """End offsets, asked again while the broker is still electing the topic's leader (a
    topic created a moment ago answers NOT_LEADER_FOR_PARTITION at first)."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            return end_offsets(consumer, topic)
        except KafkaException:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def _reached(consumer: Consumer, topic: str, ends: dict[int, int]) -> bool:
    """Whether every partition's position is at (or past) its end offset of ``ends``."""
    wanted = [p for p, end in ends.items() if end > 0]
    if not wanted:
        return True
    positions = consumer.position([TopicPartition(topic, p) for p in wanted])
    return all(tp.offset >= ends[tp.partition] for tp in positions)


def _summary(state: ModelState) -> str:
    routing = " ".join(f"{v}={w}" for v, w in state.routed().items())
    shadow = f" shadow {state.shadow}" if state.shadow else ""
    return f"rev {state.revision} loaded {state.loaded} route {routing}{shadow}"


def read_states(
    consumer: Consumer, topic: str, *, timeout_s: float = 30.0
) -> dict[str, ModelState]:
    """Every model's current state: ``topic`` read from the beginning to its end now."""
    numbers = partitions(consumer, topic)
    if not numbers:
        raise LookupError(f"topic {topic} does not exist; run `streaminfer topics create`")
    ends = _end_offsets(consumer, topic, timeout_s=timeout_s)
    consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in numbers])
    states: dict[str, ModelState] = {}
    deadline = time.monotonic() + timeout_s
    while not _reached(consumer, topic, ends):
        if time.monotonic() > deadline:
            raise TimeoutError(f"{topic} not read to its end within {timeout_s:.0f}s")
        message = consumer.poll(_POLL_S)
        decoded = decode_record(message) if message is not None and not message.error() else None
        if decoded is not None:
            model, state = decoded
            if state is None:
                states.pop(model, None)
            else:
                states[model] = state
    return states


def publish_state(
    producer: Producer, topic: str, state: ModelState, *, timeout_s: float = 30.0
) -> None:
    """Write ``state`` (key = model name) and wait until Kafka acknowledged it."""
    errors: list[str] = []

    def delivered(err: object, _message: Message) -> None:
        if err is not None:
            errors.append(str(err))

    headers: HeaderList = [
        (Headers.CONTENT_TYPE, Headers.MSGPACK),
        (Headers.SCHEMA, STATE_SCHEMA.encode()),
    ]
    producer.produce(
        topic,
        key=state.model.encode(),
        value=_STATES.encode(state),
        headers=headers,
        on_delivery=delivered,
    )
    if producer.flush(timeout_s) != 0 or errors:
        raise RuntimeError(f"the control record for {state.model} was not acknowledged: {errors}")


def follow_new_versions(control: ControlPlane, catalog: ModelCatalog) -> None:
    """Re-read a model's contract when its state names a version ``catalog`` has not seen
    (a version folder added after this worker started)."""

    def reload(model: str) -> None:
        state = control.state(model)
        try:
            if state is not None and set(state.versions()) - catalog.spec(model).versions.keys():
                catalog.reload(model)
        except (UnknownModel, ValueError) as exc:
            log.error("control: %s: %s", model, exc)

    control.subscribe(reload)

"""Typed exceptions the stage runtime understands."""

from __future__ import annotations

from typing import Literal

# "The request is bad" (the client's fault): found at the first stage.
ClientReason = Literal[
    "malformed",
    "unknown_model",
    "signature_mismatch",
    "non_finite",
    "out_of_range",
    "expired",
    "too_large",
    # The request's named features cannot make the model's inputs (a missing feature, a
    # value that is not a number; a validate processor, stages.plugins): the client's fault.
    "parse_error",
]
# "The pipeline cannot process good input" (a broken model, a bug). A plugin failing in
# infer (preprocess_error, postprocess_error) is one of these.
PipelineReason = Literal[
    "inference_error",
    "preprocess_error",
    "postprocess_error",
    "stage_error",
]
Reason = Literal[ClientReason, PipelineReason]


class InvalidRecord(Exception):
    """This record cannot be processed: it goes to the DLQ with ``reason`` and ``detail``.

    ``reason`` is a stable machine-readable code (the ``dlq.reason`` header); ``detail`` is
    the human explanation (the ``dlq.error`` header).
    """

    def __init__(self, reason: Reason, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason: Reason = reason
        self.detail = detail


class SinkUnavailable(Exception):
    """A downstream system (Redis, ...) is failing transiently: nothing in the batch is
    wrong, so the runtime rewinds and retries the whole batch after ``retry_after_s``.
    Never a reason to dead-letter."""

    def __init__(self, detail: str, *, retry_after_s: float = 0.5) -> None:
        super().__init__(detail)
        self.retry_after_s = retry_after_s


class DeliveryFailed(Exception):
    """Kafka did not acknowledge every output of a batch; its offsets were not committed."""


class TransactionAborted(Exception):
    """The open Kafka transaction was aborted (outputs and offsets discarded together): the
    runtime rewinds its partitions to the committed offsets and reprocesses."""


class OutputTooLarge(TransactionAborted):
    """The producer refused an output as over its maximum size (``size`` is our estimate of
    it), although the runtime's own check let it through. Nothing since the last commit is
    published (exactly-once: the transaction was aborted), as for any
    :class:`TransactionAborted`; the runtime also lowers its size limit under ``size``, so the
    replayed record is dead-lettered as ``too_large`` instead of failing again."""

    def __init__(self, detail: str, *, size: int) -> None:
        super().__init__(detail)
        self.size = size


class DlqLimitExceeded(Exception):
    """Too many records are failing in this stage: it stops rather than flush the stream into
    the DLQ (a broken model must not eat the input). Nothing of the batch was committed."""


class ConsumerFailed(Exception):
    """The consumer hit an error it cannot recover from in this process (librdkafka's fatal
    errors, e.g. a static member fenced by its own rejoin after a coordinator moved). The
    worker exits with ``EXIT_STUCK`` (75) so that its supervisor starts a fresh one, which
    rejoins with the same ``group.instance.id`` and takes the partitions back."""


class ConsumerStuck(ConsumerFailed):
    """The consumer lost its partitions and, for longer than the stage's rejoin timeout,
    was assigned nothing again: librdkafka can stay stuck rejoining after a broker restart
    (a JoinGroup left in its coordinator queue, re-timed-out every minute). The worker exits
    at once with ``EXIT_STUCK``, without closing the consumer (close would wait on the same
    coordinator), and a fresh one rejoins."""

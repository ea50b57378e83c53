"""Command-line clients: ``streaminfer ingest``, ``produce`` and ``results``.

``produce FILE|-`` reads JSON lines, one request per line in the same forms as the HTTP API
(``key``, optional ``id``/``created_at``, tensors as ``data`` or ``values``), checks each
exactly as the API does, produces the valid ones to ``inference.requests``, and ends with a
summary; it exits 1 if any line was invalid or not acknowledged by Kafka.

``results`` prints ``inference.results`` as JSON lines (tensors as ``values`` lists):
by default what the topic holds now, then exits; ``--follow`` prints new results as they
come until Ctrl-C, and ``--from-beginning`` makes ``--follow`` start with the older ones.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import uuid
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TextIO

import msgspec
from confluent_kafka import OFFSET_BEGINNING, OFFSET_END, Consumer, Message, TopicPartition

from ingest.payloads import InvalidBody, RequestDecoder, parse
from ingest.rendering import result_json
from kafkaio.offsets import end_offsets, partitions
from kafkaio.produce import RequestProducer
from schemas import DecodeError
from streaminfer.kafka import make_consumer, make_producer
from streaminfer.settings import Settings
from streaminfer.wiring import model_catalog


def run_ingest(settings: Settings, args: argparse.Namespace) -> int:
    from ingest.server import serve
    from streaminfer.ingest_app import FACTORY
    from streaminfer.logs import uvicorn_log_config
    from streaminfer.monitoring import share_ingest_metrics

    port = settings.ingest.port if args.port is None else args.port
    workers = args.workers or settings.ingest.workers
    share_ingest_metrics(settings, port=port, workers=workers)
    # The app factory runs in each worker and reads the environment: the gRPC door (and the
    # host it shares with HTTP) travel that way. With workers > 1 every worker binds the gRPC
    # port (gRPC sets SO_REUSEPORT) and the kernel spreads the connections.
    if args.grpc_port is not None:
        os.environ.update({"STREAMINFER_INGEST_GRPC_PORT": str(args.grpc_port)})
    if args.host:
        os.environ.update({"STREAMINFER_INGEST_HOST": args.host})
    # The factory reads the same environment (and .env) as ``settings`` came from.
    return serve(
        FACTORY,
        host=args.host or settings.ingest.host,
        port=port,
        workers=workers,
        log_config=uvicorn_log_config(settings.log_format),  # None: uvicorn's own
        # grpc.aio runs on the standard asyncio loop, not uvloop
        loop="auto" if args.grpc_port is None and settings.ingest.grpc_port is None else "asyncio",
    )


class Progress:
    """A one-line progress display on a terminal (a bar when the total is known)."""

    def __init__(self, stream: TextIO, total: int | None) -> None:
        self._stream = stream
        self._total = total
        self.live = stream.isatty()
        self._started = time.monotonic()
        self._shown = 0.0

    def update(self, sent: int, invalid: int, *, force: bool = False) -> None:
        now = time.monotonic()
        if not self.live or (not force and now - self._shown < 0.2):
            return
        self._shown = now
        rate = sent / max(now - self._started, 1e-9)
        done = sent + invalid
        if self._total:
            filled = int(30 * done / self._total)
            head = f"[{'#' * filled}{'.' * (30 - filled)}] {done}/{self._total}"
        else:
            head = f"{done} lines"
        self._stream.write(f"\r{head}  sent {sent}  invalid {invalid}  {rate:,.0f}/s ")
        self._stream.flush()

    def done(self) -> None:
        if self.live:
            self._stream.write("\n")


def _lines(source: str) -> tuple[Iterable[str], int | None]:
    if source == "-":
        return sys.stdin, None
    path = Path(source)
    with path.open() as counting:
        total = sum(1 for line in counting if line.strip())
    return path.open(), total


def produce_lines(settings: Settings, source: str, *, err: TextIO = sys.stderr) -> int:
    """``streaminfer produce``: JSON lines -> ``inference.requests``; the exit code."""
    lines, total = _lines(source)
    catalog = model_catalog(settings) if settings.ingest.check_models else None
    decoder = RequestDecoder(
        catalog=catalog, max_batch=1, message_max_bytes=settings.kafka.message_max_bytes
    )
    sender = RequestProducer(producer=make_producer(settings), topic=settings.topics.requests)
    progress = Progress(err, total)
    sent = invalid = 0
    started = time.monotonic()
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            submission = decoder.decode_one(parse(line.encode(), "application/json"), path="$")
        except InvalidBody as exc:
            invalid += 1
            start = "\n" if progress.live else ""  # off the progress line
            for error in exc.errors:
                err.write(f"{start}line {number}: {error.path}: {error.reason}: {error.message}\n")
            continue
        sender.send(submission.request, partition_key=submission.partition_key)
        sent += 1
        progress.update(sent, invalid)
    progress.update(sent, invalid, force=True)
    failed = sender.flush(settings.kafka.delivery_timeout_s)
    progress.done()
    seconds = time.monotonic() - started
    err.write(
        f"sent {sent}, acknowledged {sent - failed}, not acknowledged {failed}, "
        f"invalid lines {invalid}, {seconds:.2f}s ({sent / max(seconds, 1e-9):,.0f}/s)\n"
    )
    return 0 if failed == 0 and invalid == 0 else 1


def print_results(
    settings: Settings,
    *,
    follow: bool,
    from_beginning: bool,
    out: TextIO = sys.stdout,
    err: TextIO = sys.stderr,
) -> int:
    """``streaminfer results``: ``inference.results`` as JSON lines; the exit code."""
    topic = settings.topics.results
    group = f"{settings.kafka.topic_prefix}streaminfer.results-cli.{uuid.uuid4().hex[:8]}"
    consumer = make_consumer(settings, group_id=group)
    try:
        found = partitions(consumer, topic)
        if not found:
            err.write(f"topic {topic} does not exist\n")
            return 1
        start = OFFSET_END if follow and not from_beginning else OFFSET_BEGINNING
        consumer.assign([TopicPartition(topic, p, start) for p in found])
        messages = _follow(consumer) if follow else _until_end(consumer, topic, found)
        for message in messages:
            _print_result(message, out, err)
    except KeyboardInterrupt:
        pass
    finally:
        consumer.close()
    return 0


def _follow(consumer: Consumer) -> Iterator[Message]:
    while True:
        yield from (m for m in consumer.consume(500, timeout=0.5) if m.error() is None)


def _until_end(consumer: Consumer, topic: str, numbers: list[int]) -> Iterator[Message]:
    """Every record up to the partitions' ends as they were when this started."""
    ends = end_offsets(consumer, topic)

    def at_end() -> bool:
        positions = consumer.position([TopicPartition(topic, p) for p in numbers])
        return all(tp.offset >= ends[tp.partition] for tp in positions if ends[tp.partition] > 0)

    while not at_end():
        yield from (m for m in consumer.consume(500, timeout=0.5) if m.error() is None)


def _print_result(message: Message, out: TextIO, err: TextIO) -> None:
    try:
        document = result_json(message.value() or b"")
    except DecodeError as exc:
        err.write(f"offset {message.offset()}: not an inference.result/1 ({exc})\n")
        return
    out.write(msgspec.json.encode(document).decode() + "\n")
    out.flush()

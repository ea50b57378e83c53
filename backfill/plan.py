"""From command-line arguments to checked sources and a saved checkpoint, before any send.

Everything that can be wrong with a request for a backfill -- unknown model or version, a
file that cannot be read or mapped, a checkpoint that already exists (or is missing for
``--resume``), a file that changed since its checkpoint -- is found here, so a mistake in
the tenth file does not leave nine half-sent.
"""

from __future__ import annotations

import argparse
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from backfill.checkpoint import Checkpoint, CheckpointStore, RejectReport, SourceState
from backfill.context import BackfillContext
from backfill.engine import BackfillRun, Source
from backfill.files import FileSource, fingerprint, new_file_state
from backfill.ids import check_backfill_id, new_backfill_id
from backfill.mapping import MappingError, parse_columns_option, plan_mapping
from backfill.pacing import ProgressLine, TokenBucket
from backfill.readers import FORMATS, FileReader, Format, detect_format, open_reader
from backfill.replay import ReplaySource, parse_timestamp, window_sources
from backfill.topics import DeadLetterWatcher
from schemas.models import ModelCatalog, ModelSpec
from schemas.validation import request_size_limit

_DLQ_LOOKBACK_MS = 60_000  # DLQ records carry the stage's clock; allow for skew


class UsageError(Exception):
    """A mistake in the command line or its files; the CLI prints it and exits with 2."""


@dataclass
class Plan:
    store: CheckpointStore
    checkpoint: Checkpoint
    sources: list[Source]
    closers: list[Callable[[], None]] = field(default_factory=list)


def checkpoint_store(context: BackfillContext) -> CheckpointStore:
    return CheckpointStore(context.checkpoint_dir)


def plan_files(context: BackfillContext, args: argparse.Namespace) -> Plan:
    store = checkpoint_store(context)
    if args.resume:
        checkpoint = _resumable(store, args, "files")
        readers = [_resumed_reader(state, context) for state in checkpoint.sources]
    else:
        checkpoint = _new_checkpoint(store, args, "files", prefix="bf")
        readers = _readers(args.paths, args.format, context)
        checkpoint.sources = [new_file_state(reader) for reader in readers]
    spec = _model(context, checkpoint)
    option = parse_columns_option(checkpoint.columns)
    sources: list[Source] = []
    for reader, state in zip(readers, checkpoint.sources, strict=True):
        try:
            mapping = plan_mapping(spec, reader.columns(), option)
        except MappingError as exc:
            raise UsageError(f"{reader.path}: {exc}") from None
        sources.append(
            FileSource(
                reader=reader,
                mapping=mapping,
                state=state,
                backfill_id=checkpoint.backfill_id,
                model=checkpoint.model,
                version=checkpoint.model_version,
            )
        )
    store.save(checkpoint)
    return Plan(store=store, checkpoint=checkpoint, sources=sources)


def plan_replay(context: BackfillContext, args: argparse.Namespace) -> Plan:
    store = checkpoint_store(context)
    topic = context.topics.requests
    consumer = context.new_reader()
    if args.resume:
        checkpoint = _resumable(store, args, "replay")
    else:
        if not args.from_:
            raise UsageError("--from is required (unless --resume)")
        checkpoint = _new_checkpoint(store, args, "replay", prefix="rp")
        checkpoint.replay_topic = topic
        checkpoint.replay_from_ms = _timestamp(args.from_)
        checkpoint.replay_to_ms = _timestamp(args.to) if args.to else int(time.time() * 1000)
        checkpoint.sources = window_sources(
            consumer, topic, checkpoint.replay_from_ms, checkpoint.replay_to_ms
        )
    _model(context, checkpoint)
    sources: list[Source] = [
        ReplaySource(
            consumer=consumer,
            topic=checkpoint.replay_topic or topic,
            state=state,
            replay_id=checkpoint.backfill_id,
            model=checkpoint.model,
            version=checkpoint.model_version,
        )
        for state in checkpoint.sources
    ]
    store.save(checkpoint)
    return Plan(store=store, checkpoint=checkpoint, sources=sources, closers=[consumer.close])


@contextmanager
def start_run(
    context: BackfillContext, plan: Plan, *, stop: threading.Event, rate: float | None
) -> Iterator[BackfillRun]:
    """The send loop for ``plan``, with its producer, rejects report and DLQ watcher."""
    checkpoint = plan.checkpoint
    bid = checkpoint.backfill_id
    rejects = RejectReport(plan.store.rejects_path(bid))
    dead_letters = DeadLetterWatcher(
        context.new_reader(),
        context.topics.dlq,
        bid,
        since_ms=int(checkpoint.created_at * 1000) - _DLQ_LOOKBACK_MS,
    )
    run = BackfillRun(
        producer=context.new_producer(),
        topic=context.topics.requests_backfill,
        store=plan.store,
        checkpoint=checkpoint,
        rejects=rejects,
        stop=stop,
        progress=ProgressLine(f"{'backfill' if checkpoint.kind == 'files' else 'replay'} {bid}"),
        pacer=TokenBucket(rate) if rate else None,
        # the margin ingest keeps too: whatever is sent can flow to the end (or the DLQ)
        max_request_bytes=request_size_limit(context.message_max_bytes),
        dead_letters=dead_letters,
        checkpoint_interval_s=context.checkpoint_interval_s,
        drain_timeout_s=context.delivery_timeout_s + 10,
    )
    try:
        yield run
    finally:
        rejects.close()
        dead_letters.close()
        for close in plan.closers:
            close()


def _new_checkpoint(
    store: CheckpointStore, args: argparse.Namespace, kind: str, *, prefix: str
) -> Checkpoint:
    try:
        bid = check_backfill_id(args.backfill_id or new_backfill_id(prefix))
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    if store.exists(bid):
        raise UsageError(
            f"{bid} already has a checkpoint ({store.path(bid)}): add --resume to continue "
            "it, or choose another id"
        )
    if not args.model:
        raise UsageError("--model is required")
    now = time.time()
    return Checkpoint(
        backfill_id=bid,
        kind="files" if kind == "files" else "replay",
        model=args.model,
        model_version=args.version,
        columns=_columns(args),
        created_at=now,
        updated_at=now,
        sources=[],
    )


def _resumable(store: CheckpointStore, args: argparse.Namespace, kind: str) -> Checkpoint:
    if not args.backfill_id:
        raise UsageError("--resume needs the id of the run to continue")
    if not store.exists(args.backfill_id):
        raise UsageError(f"no checkpoint for {args.backfill_id} in {store.directory}")
    checkpoint = store.load(args.backfill_id)
    if checkpoint.kind != kind:
        raise UsageError(f"{args.backfill_id} is a {checkpoint.kind} backfill, not {kind}")
    asked = {"model": args.model, "version": args.version, "columns": _columns(args)}
    stored = {
        "model": checkpoint.model,
        "version": checkpoint.model_version,
        "columns": checkpoint.columns,
    }
    for name, value in asked.items():
        if value is not None and value != stored[name]:
            raise UsageError(f"--{name} {value} differs from the checkpoint's {stored[name]}")
    paths = getattr(args, "paths", None)
    if paths and [str(Path(p).resolve()) for p in paths] != [s.name for s in checkpoint.sources]:
        raise UsageError("on --resume, give no PATH or exactly the files of the first run")
    return checkpoint


def _model(context: BackfillContext, checkpoint: Checkpoint) -> ModelSpec:
    spec = ModelCatalog(context.models_dir).spec(checkpoint.model)
    spec.resolve_version(checkpoint.model_version)
    return spec


def _readers(paths: list[str], fmt: str, context: BackfillContext) -> list[FileReader]:
    if not paths:
        raise UsageError("no PATH given")
    files = [f for p in paths for f in _expand(Path(p), fmt)]
    resolved = [f.resolve() for f in files]
    if len(set(resolved)) != len(resolved):
        raise UsageError("a file is listed twice")
    return [_open(f, _format(f, fmt), context) for f in files]


def _expand(path: Path, fmt: str) -> list[Path]:
    """A file, or a directory's files (recursively, sorted) that have a known format."""
    if not path.exists():
        raise UsageError(f"{path}: no such file or directory")
    if not path.is_dir():
        return [path]
    found = []
    for child in sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith(".")):
        try:
            _format(child, fmt)
        except MappingError:
            continue
        found.append(child)
    if not found:
        raise UsageError(f"{path}: no CSV, JSON lines or Parquet files in it")
    return found


def _format(path: Path, fmt: str) -> Format:
    """``fmt`` when it names a format, else the one the file's name says (``auto``)."""
    named: dict[str, Format] = {name: name for name in FORMATS}
    return named.get(fmt) or detect_format(path)


def _resumed_reader(state: SourceState, context: BackfillContext) -> FileReader:
    path = Path(state.name)
    if not path.exists():
        raise UsageError(f"{path} (in the checkpoint) no longer exists")
    if fingerprint(path) != state.fingerprint:
        raise UsageError(f"{path} changed since the checkpoint was written; cannot resume")
    return _open(path, _format(path, state.format), context)


def _open(path: Path, fmt: Format, context: BackfillContext) -> FileReader:
    return open_reader(
        path, fmt, batch_rows=context.batch_rows, max_row_bytes=context.max_row_bytes
    )


def _columns(args: argparse.Namespace) -> list[str] | None:
    columns: list[str] | None = getattr(args, "columns", None)  # replay has no --columns
    return columns


def _timestamp(text: str) -> int:
    try:
        return parse_timestamp(text)
    except ValueError as exc:
        raise UsageError(str(exc)) from None

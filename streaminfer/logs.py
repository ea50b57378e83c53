"""Log lines: text for people, or JSON lines for log shippers (``STREAMINFER_LOG_FORMAT=json``).

A JSON line is one object: ``time`` (UTC, ISO 8601, milliseconds), ``level``, ``logger``,
``message``, ``stage`` and ``worker`` (null outside a stage), ``trace_id`` (null unless a
record or batch is in hand: the record replayed alone by the runtime, else the current span
when tracing is on, i.e. the batch span while a batch is processed) and, after an exception,
``exception`` (the formatted traceback).
"""

from __future__ import annotations

import json
import logging
import os
import sys
from datetime import UTC, datetime
from typing import Any, Literal

from stages.tracing import record_trace_id

LogFormat = Literal["text", "json"]


def current_trace_id() -> str | None:
    """The trace id of what is in hand: the one record the runtime replays alone, else the
    current OpenTelemetry span's (only looked up when something already imported the API:
    logging never imports it)."""
    trace_id = record_trace_id()
    if trace_id is not None:
        return trace_id
    otel = sys.modules.get("opentelemetry.trace")
    if otel is None:
        return None
    context = otel.get_current_span().get_span_context()
    return f"{context.trace_id:032x}" if context.is_valid else None


class JsonFormatter(logging.Formatter):
    """One JSON object per record; see the module docstring."""

    def __init__(self, *, stage: str | None = None, worker: str | None = None) -> None:
        super().__init__()
        self._stage = stage
        self._worker = worker

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            "stage": self._stage,
            "worker": self._worker or (f"{self._stage}-{os.getpid()}" if self._stage else None),
            "trace_id": current_trace_id(),
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False, default=str)


def formatter(
    log_format: LogFormat, *, stage: str | None = None, worker: str | None = None
) -> logging.Formatter:
    if log_format == "json":
        return JsonFormatter(stage=stage, worker=worker)
    who = f" {worker or stage}" if (worker or stage) else ""
    return logging.Formatter(f"%(asctime)s{who} %(levelname)s %(name)s: %(message)s")


def configure(
    log_format: LogFormat,
    *,
    stage: str | None = None,
    worker: str | None = None,
    level: int = logging.INFO,
) -> None:
    """Route every log record of this process to stderr in ``log_format``."""
    handler = logging.StreamHandler()
    handler.setFormatter(formatter(log_format, stage=stage, worker=worker))
    logging.basicConfig(level=level, handlers=[handler], force=True)


def uvicorn_log_config(log_format: LogFormat, *, stage: str = "ingest") -> dict[str, Any] | None:
    """uvicorn's ``log_config`` for ``log_format``: None keeps uvicorn's own text format;
    JSON sends uvicorn's loggers and the app's through :class:`JsonFormatter` (built in
    each worker process, so ``worker`` names its pid)."""
    if log_format != "json":
        return None
    handler = {"class": "logging.StreamHandler", "formatter": "json", "stream": "ext://sys.stderr"}
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"json": {"()": f"{__name__}.JsonFormatter", "stage": stage}},
        "handlers": {"default": handler},
        "loggers": {
            "uvicorn": {"handlers": ["default"], "level": "INFO", "propagate": False},
            "uvicorn.access": {"handlers": ["default"], "level": "INFO", "propagate": False},
        },
        "root": {"handlers": ["default"], "level": "INFO"},
    }

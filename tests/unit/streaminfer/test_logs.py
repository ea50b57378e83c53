"""JSON log lines: one object per line with stage, worker and the trace id in hand."""

from __future__ import annotations

import io
import json
import logging
import os
import subprocess
import sys
from collections.abc import Iterator

import pytest
from opentelemetry.sdk.trace import TracerProvider

from schemas import Headers
from stages.records import Record
from stages.tracing import record_in_hand
from streaminfer.logs import JsonFormatter, formatter, uvicorn_log_config
from tests.helpers import REPO

TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"


@pytest.fixture()
def captured() -> Iterator[tuple[logging.Logger, io.StringIO]]:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter(stage="infer", worker="infer[2]"))
    logger = logging.getLogger(f"streaminfer.test.{id(stream)}")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    yield logger, stream
    logger.removeHandler(handler)


def lines(stream: io.StringIO) -> list[dict[str, object]]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


def test_a_line_is_one_json_object_with_every_field(
    captured: tuple[logging.Logger, io.StringIO],
) -> None:
    logger, stream = captured
    logger.warning("lag is %d", 42)
    (line,) = lines(stream)
    assert line["message"] == "lag is 42"
    assert line["level"] == "WARNING" and line["logger"] == logger.name
    assert line["stage"] == "infer" and line["worker"] == "infer[2]"
    assert line["trace_id"] is None
    assert isinstance(line["time"], str) and line["time"].endswith("+00:00")


def test_the_record_in_hand_gives_the_trace_id(
    captured: tuple[logging.Logger, io.StringIO],
) -> None:
    logger, stream = captured
    tp = f"00-{TRACE}-00f067aa0ba902b7-01".encode()
    record = Record("t", 0, 1, None, b"v", ((Headers.TRACEPARENT, tp),))
    with record_in_hand(record):
        logger.error("isolating")
    logger.error("after")
    first, after = lines(stream)
    assert first["trace_id"] == TRACE
    assert after["trace_id"] is None


def test_the_current_span_gives_the_trace_id_when_tracing_is_on(
    captured: tuple[logging.Logger, io.StringIO],
) -> None:
    logger, stream = captured
    tracer = TracerProvider().get_tracer("t")
    with tracer.start_as_current_span("validate batch") as span:
        logger.info("batch")
    (line,) = lines(stream)
    assert line["trace_id"] == f"{span.get_span_context().trace_id:032x}"


def test_an_exception_travels_in_the_same_line(
    captured: tuple[logging.Logger, io.StringIO],
) -> None:
    logger, stream = captured
    try:
        raise ValueError("bad \n tensor")
    except ValueError:
        logger.exception("failed")
    (line,) = lines(stream)  # the newline inside stays escaped: still one line
    assert "ValueError: bad" in str(line["exception"])


def test_text_is_the_default_and_names_the_worker() -> None:
    record = logging.LogRecord("x", logging.INFO, __file__, 1, "hello", None, None)
    assert (
        formatter("text", stage="persist", worker="persist[0]")
        .format(record)
        .endswith(" persist[0] INFO x: hello")
    )
    assert uvicorn_log_config("text") is None
    config = uvicorn_log_config("json")
    assert config is not None
    assert config["formatters"]["json"]["()"] == "streaminfer.logs.JsonFormatter"


def test_the_cli_logs_json_lines_when_asked() -> None:
    env = {**os.environ, "STREAMINFER_LOG_FORMAT": "json"}
    code = (
        "import logging, sys\n"
        "from streaminfer.logs import configure\n"
        "from streaminfer.settings import Settings\n"
        "configure(Settings().log_format, stage='validate', worker='validate[0]')\n"
        "logging.getLogger('stages.runtime').info('consuming')\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    line = json.loads(done.stderr.strip())
    assert line["message"] == "consuming" and line["worker"] == "validate[0]"

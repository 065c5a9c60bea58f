"""Structured logs: JSON lines for `serve` and `worker`, readable lines for `dev`.

Our own events go through structlog; records of libraries using `logging` (RQ, aiohttp) are rendered
by the same renderer, so a log collector reads one format from every line.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from collections.abc import MutableMapping
from typing import Any

import orjson
import structlog

from receiver.clock import utc_now

_HANDLER_MARK = "_intergiro_receiver"


def _dumps(event: Any, **kw: Any) -> str:
    """orjson, faster than `json.dumps` for one log line; the standard library's text
    for what orjson does not write the same way (non-ASCII, integers beyond 64 bits)."""
    try:
        line = orjson.dumps(event, default=kw.get("default"))
    except TypeError:
        return json.dumps(event, **kw)
    return line.decode() if line.isascii() else json.dumps(event, **kw)


def add_timestamp(logger: Any, method_name: str, event_dict: MutableMapping[str, Any]) -> Any:
    """`timestamp`: UTC, to the millisecond (structlog's TimeStamper formats a datetime per line)."""
    event_dict["timestamp"] = utc_now()
    return event_dict


def add_pid(logger: Any, method_name: str, event_dict: MutableMapping[str, Any]) -> Any:
    """`pid`: which process wrote the line (workers and receivers run several)."""
    event_dict["pid"] = os.getpid()
    return event_dict


class LineWriter:
    """Writes each log line whole, with one write() of the file descriptor: the lines of several
    threads (a worker's deliveries) and of several processes sharing one output (`worker --processes`)
    never interleave, as `print` (the text, then the newline) lets them. A stream with no descriptor
    (a test's capture) is written as a stream."""

    def __init__(self, stream: Any) -> None:
        self.stream = stream
        try:
            self.fd: int | None = stream.fileno()
        except (AttributeError, OSError, ValueError):
            self.fd = None

    def write_line(self, line: str) -> None:
        data = (line + "\n").encode("utf-8", "backslashreplace")
        if self.fd is None:
            self.stream.write(data.decode())
            self.stream.flush()
            return
        while data:  # one write unless the line is larger than the pipe takes at once
            written = os.write(self.fd, data)
            data = data[written:]

    # structlog's logger interface: every level is one line
    def msg(self, message: str) -> None:
        self.write_line(message)

    log = debug = info = warn = warning = error = critical = exception = fatal = msg


class LineHandler(logging.Handler):
    """The standard library's records (RQ, aiohttp), one whole line each through a LineWriter."""

    def __init__(self, writer: LineWriter) -> None:
        super().__init__()
        self.writer = writer

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.writer.write_line(self.format(record))
        except Exception:
            self.handleError(record)


def configure_logging(log_format: str = "json", level: str = "INFO") -> None:
    renderer: structlog.types.Processor = (
        structlog.dev.ConsoleRenderer(colors=False)
        if log_format == "console"
        else structlog.processors.JSONRenderer(serializer=_dumps)
    )
    # JSON needs a traceback as text; the console renderer formats exceptions itself.
    exceptions = [] if log_format == "console" else [structlog.processors.format_exc_info]
    writer = LineWriter(sys.stderr)
    structlog.configure(
        processors=[
            structlog.processors.add_log_level,
            add_timestamp,
            add_pid,
            *exceptions,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelName(level)),
        logger_factory=lambda *args: writer,
        cache_logger_on_first_use=False,
    )
    handler = LineHandler(writer)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=[
                structlog.stdlib.add_logger_name,
                structlog.processors.add_log_level,
                add_timestamp,
                add_pid,
            ],
            processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, *exceptions, renderer],
        )
    )
    setattr(handler, _HANDLER_MARK, True)
    root = logging.getLogger()
    for old in [h for h in root.handlers if getattr(h, _HANDLER_MARK, False)]:
        root.removeHandler(old)  # configured again (tests): replace, never add a second
    root.addHandler(handler)
    root.setLevel(level)


log = structlog.get_logger("intergiro_receiver")

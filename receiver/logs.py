"""Structured logs: JSON lines for `serve` and `worker`, readable lines for `dev`.

Our own events go through structlog; records of libraries using `logging` (RQ, aiohttp) are rendered
by the same renderer, so a log collector reads one format from every line.

Many processes share one stderr (`serve --processes N`, `worker --processes N`, `dev`): each line is
written whole, with one `write(2)` on the file descriptor, and is at most PIPE_BUF bytes, the size
the kernel writes to a pipe without interleaving another process's write. A line that would be longer
has its longest texts cut (and says `"truncated": true`).
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import time
from collections.abc import Callable, MutableMapping
from typing import Any, TextIO

import orjson
import structlog

from receiver.clock import utc_now
from receiver.errors import IntergiroReceiverError

_HANDLER_MARK = "_intergiro_receiver"
# Linux's PIPE_BUF: a write to a pipe of at most this many bytes is never split or interleaved.
MAX_LINE_BYTES = 4096
_CUT_MARK = "[...]"


class LoggedOutcome(IntergiroReceiverError):
    """An exception that stands for an outcome we log ourselves (a dead letter): a library's record
    made while it is handled (RQ's ERROR line with its traceback) is left out."""


class LineWriter:
    """Writes each line with one `os.write` on the stream's file descriptor, so that lines of several
    processes sharing it never interleave; a stream without one (a test's capture) is written as is."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream
        try:
            self.fd: int | None = stream.fileno()
        except (AttributeError, OSError, ValueError):  # io.UnsupportedOperation is both
            self.fd = None

    def write(self, text: str) -> int:
        if self.fd is None:
            written = self.stream.write(text)
            self.stream.flush()
            return written
        data = memoryview(text.encode("utf-8", "backslashreplace"))
        while data:  # a blocking write is whole; a signal may still interrupt one part-way
            data = data[os.write(self.fd, data) :]
        return len(text)

    def flush(self) -> None:
        """Nothing is buffered."""


def _render(event: Any, **kw: Any) -> str:
    """orjson, faster than `json.dumps` for one log line; the standard library's text
    for what orjson does not write the same way (non-ASCII, integers beyond 64 bits). ASCII only, so
    its length is its size in bytes."""
    try:
        line = orjson.dumps(event, default=kw.get("default"))
    except TypeError:
        return json.dumps(event, **kw)
    return line.decode() if line.isascii() else json.dumps(event, **kw)


def _dumps(event: Any, **kw: Any) -> str:
    """One JSON line of at most MAX_LINE_BYTES - 1 bytes (its newline follows): a longer one has its
    longest texts cut (a traceback keeps its end, where the error is), and `truncated` set."""
    line = _render(event, **kw)
    if len(line) < MAX_LINE_BYTES:
        return line
    fitted = dict(event, truncated=True)
    for _ in range(32):
        texts = [k for k, v in fitted.items() if isinstance(v, str) and len(v) > 64]
        excess = len(line) - (MAX_LINE_BYTES - 1)
        if excess <= 0 or not texts:
            break
        name = max(texts, key=lambda k: len(fitted[k]))
        value = fitted[name]
        keep = max(32, len(value) - excess - len(_CUT_MARK) - 16, len(value) // 4)
        fitted[name] = _CUT_MARK + value[-keep:] if name == "exception" else value[:keep] + _CUT_MARK
        line = _render(fitted, **kw)
    if len(line) >= MAX_LINE_BYTES:  # many fields, or one long list: what always fits
        short = {k: event[k] for k in ("event", "level", "timestamp", "pid", "logger") if k in event}
        line = _render({k: str(v)[:512] for k, v in short.items()} | {"truncated": True}, **kw)
    return line


def _not_a_logged_outcome(record: logging.LogRecord) -> bool:
    """False for a library's record made while a LoggedOutcome is handled: we logged it already."""
    error = record.exc_info[1] if record.exc_info else sys.exc_info()[1]
    return not isinstance(error, LoggedOutcome)


def add_timestamp(logger: Any, method_name: str, event_dict: MutableMapping[str, Any]) -> Any:
    """`timestamp`: UTC, to the millisecond (structlog's TimeStamper formats a datetime per line)."""
    event_dict["timestamp"] = utc_now()
    return event_dict


def add_pid(logger: Any, method_name: str, event_dict: MutableMapping[str, Any]) -> Any:
    """`pid`: which process wrote the line (workers and receivers run several)."""
    event_dict["pid"] = os.getpid()
    return event_dict


class OncePer:
    """Lets through one event per `seconds` (a condition that would otherwise log once per callback),
    and says how many were held back since the last one."""

    def __init__(self, seconds: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.seconds = seconds
        self.clock = clock
        self.last = -math.inf
        self.held_back = 0

    def due(self) -> int | None:
        """The number held back since the last one let through, when this one is let through; else None."""
        now = self.clock()
        if now - self.last < self.seconds:
            self.held_back += 1
            return None
        self.last, held_back, self.held_back = now, self.held_back, 0
        return held_back


def configure_logging(log_format: str = "json", level: str = "INFO") -> None:
    renderer: structlog.types.Processor = (
        structlog.dev.ConsoleRenderer(colors=False)
        if log_format == "console"
        else structlog.processors.JSONRenderer(serializer=_dumps)
    )
    # JSON needs a traceback as text; the console renderer formats exceptions itself.
    exceptions = [] if log_format == "console" else [structlog.processors.format_exc_info]
    structlog.configure(
        processors=[
            structlog.processors.add_log_level,
            add_timestamp,
            add_pid,
            *exceptions,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelName(level)),
        logger_factory=structlog.WriteLoggerFactory(LineWriter(sys.stderr)),  # type: ignore[arg-type]
        cache_logger_on_first_use=False,
    )
    handler = logging.StreamHandler(LineWriter(sys.stderr))
    handler.addFilter(_not_a_logged_outcome)
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

"""Logs are JSON lines by default (serve, worker) and readable lines when LOG_FORMAT=console (dev)."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import structlog

from receiver.logs import configure_logging
from tests.processes import free_port


def first_log_line(cwd: Path, **env: str) -> str:
    """Start `serve`, read its first log line, stop it."""
    serve = subprocess.Popen(
        [sys.executable, "-m", "receiver", "serve"], cwd=cwd, text=True, stderr=subprocess.PIPE,
        env={"PATH": os.environ["PATH"], "RECEIVER_PORT": str(free_port()), "RECEIVER_HOST": "127.0.0.1", **env},
    )  # fmt: skip
    try:
        assert serve.stderr is not None
        return serve.stderr.readline()
    finally:
        serve.terminate()
        serve.wait(10)


def test_serve_logs_json_lines_by_default(tmp_path: Path) -> None:
    line = json.loads(first_log_line(tmp_path))
    assert (line["event"], line["level"], line["port"] > 0) == ("receiver starting", "info", True)
    assert line["timestamp"].endswith("Z")


def test_serve_logs_readable_lines_with_log_format_console(tmp_path: Path) -> None:
    line = first_log_line(tmp_path, LOG_FORMAT="console")
    assert "receiver starting" in line and "port=" in line
    assert not line.startswith("{")


@pytest.fixture
def restore_logging() -> Iterator[None]:
    before = list(logging.getLogger().handlers)
    config = structlog.get_config()
    yield
    structlog.configure(**config)  # its stream was this test's captured stderr
    for handler in logging.getLogger().handlers:
        if handler not in before:
            logging.getLogger().removeHandler(handler)


def test_library_records_are_json_lines_too_and_configuring_twice_adds_no_second_handler(
    capsys: pytest.CaptureFixture[str], restore_logging: None
) -> None:
    configure_logging("json")
    configure_logging("json")
    logging.getLogger("rq.worker").info("Listening on %s", "order-updates")
    [line] = capsys.readouterr().err.splitlines()
    assert json.loads(line) | {"timestamp": None} == {
        "event": "Listening on order-updates", "logger": "rq.worker", "level": "info", "timestamp": None,
        "pid": os.getpid(),
    }  # fmt: skip

"""Logs are JSON lines by default (serve, worker) and readable lines when LOG_FORMAT=console (dev)."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import structlog

from receiver import __version__
from receiver.app import CALLBACK_PATH
from receiver.logs import configure_logging
from tests.helpers import JWT, card_order, token
from tests.processes import free_port, start_server, start_worker, stop, worker_env


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


WRITER = """
import logging, sys
from receiver.logs import configure_logging, log
configure_logging("json")
name, lines = sys.argv[1], int(sys.argv[2])
for n in range(lines):
    if n % 50 == 0:  # a library's record, as long as a traceback can be
        logging.getLogger("rq.worker").error("job failed\\n%s", "Traceback: " + "x" * 9000)
    else:
        log.info("line", writer=name, n=n, text="é" * (n % 700) + "y" * (n * 7 % 3000))
"""


def test_several_processes_writing_at_full_speed_leave_one_json_object_on_every_line(tmp_path: Path) -> None:
    """Their lines share one pipe (a container's stderr), the longest cut to fit one atomic write."""
    read_end, write_end = os.pipe()
    writers = [
        subprocess.Popen(
            [sys.executable, "-c", WRITER, str(n), "3000"], stderr=write_end, env={"PATH": os.environ["PATH"]}
        )
        for n in range(4)
    ]
    os.close(write_end)
    with open(read_end, "rb") as pipe:
        output = pipe.read()
    assert [w.wait(60) for w in writers] == [0, 0, 0, 0]
    lines = output.split(b"\n")
    assert lines.pop() == b""
    parsed = [json.loads(line) for line in lines]  # raises on two objects, or half of one, on a line
    assert len(parsed) == 4 * 3000
    assert max(len(line) for line in lines) < 4096
    assert {(p["writer"], p["n"]) for p in parsed if p["event"] == "line"} == {
        (str(w), n) for w in range(4) for n in range(3000) if n % 50
    }
    library = [p for p in parsed if p.get("logger") == "rq.worker"]
    assert len(library) == 4 * 60 and all(
        p["truncated"] and p["event"].startswith("job failed") for p in library
    )


def test_serve_worker_and_ops_log_their_start_with_version_and_settings_and_their_stop(
    redis_url: str, tmp_path: Path
) -> None:
    secret, token = "whsec_" + "c2VjcmV0c2VjcmV0c2VjcmV0c2VjcmV0", "t" * 40
    port, ops_port = free_port(), free_port()
    env = worker_env(redis_url, merchant_webhook_url="https://user:pw-in-url@merchant.example/hook",
                     merchant_webhook_secret=secret, ops_token=token, ops_port=ops_port, ops_host="127.0.0.1")  # fmt: skip
    env.update(RECEIVER_HOST="127.0.0.1", RECEIVER_PORT=str(port))
    logs = {name: tmp_path / f"{name}.log" for name in ("serve", "worker", "ops")}
    started = [
        start_server("serve", "--processes", "1", port=port, env=env, log=logs["serve"]),
        start_worker(env, logs["worker"]),
        start_server("ops", port=ops_port, env=env, log=logs["ops"]),
    ]
    wait_for_lines(logs["worker"], "worker starting")
    for process in started:
        stop(process)
    for name, (start, end) in {
        "serve": ("receiver starting", "receiver stopped"),
        "worker": ("worker starting", "worker stopped"),
        "ops": ("ops console starting", "ops console stopped"),
    }.items():
        text = logs[name].read_text()
        assert secret not in text and token not in text and "pw-in-url" not in text
        events = [json.loads(line) for line in text.splitlines()]
        [first] = [e for e in events if e["event"] == start]
        assert first["version"] == __version__
        assert first["settings"]["destinations"] == ["merchant"]
        assert first["settings"]["redis"] == redis_url
        assert events[-1]["event"] == end, name


def wait_for_lines(log: Path, event: str, seconds: float = 30) -> None:
    deadline = time.monotonic() + seconds
    while event not in log.read_text():
        assert time.monotonic() < deadline, f"no {event!r} in {log.read_text()}"
        time.sleep(0.05)


async def test_every_line_about_a_callback_carries_its_request_id_and_a_rejected_one_its_client(
    receiver: Any, rsa_key: Any
) -> None:
    with structlog.testing.capture_logs() as logs:
        await receiver.post(
            CALLBACK_PATH, data=b"not.a.token", headers={**JWT, "X-Request-ID": "req-rejected-1"}
        )
        await receiver.post(
            CALLBACK_PATH, data=json.dumps({"status": 400, "type": "malformed content"}),
            headers={"Content-Type": "application/json", "X-Request-ID": "req-error-object"},
        )  # fmt: skip
        await receiver.post(
            CALLBACK_PATH, data=token(card_order("RequestIdOrder01"), rsa_key), headers={**JWT, "X-Request-ID": "req-ok"}
        )  # fmt: skip
    lines = {line["event"]: line for line in logs}
    assert (lines["callback rejected"]["request_id"], lines["callback rejected"]["client"]) == (
        "req-rejected-1", "127.0.0.1"
    )  # fmt: skip
    assert lines["intergiro error object received"]["request_id"] == "req-error-object"
    assert lines["callback"]["request_id"] == "req-ok"

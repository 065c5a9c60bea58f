"""`bin/dev` in a fresh clone: everything starts, the printed send command reaches the local sink,
and Ctrl-C stops everything (no process left, every port free)."""

from __future__ import annotations

import hashlib
import importlib.util
import os
import queue
import re
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.redis_server import free_port

ROOT = Path(__file__).resolve().parents[1]
VENV = Path(sys.prefix)
WORKERS_MISSING = importlib.util.find_spec("workers.runner") is None


def port_is_free(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def processes_in(folder: Path) -> list[str]:
    """Processes whose working directory or command line is inside `folder`."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            cwd = os.readlink(proc / "cwd")
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if cwd.startswith(str(folder)) or str(folder) in cmdline:
            found.append(f"{proc.name}: {cmdline}")
    return found


class Lines:
    """A process's output, line by line, read in a thread so that waiting has a deadline."""

    def __init__(self, stream: Iterator[str]) -> None:
        self.seen: list[str] = []
        self._queue: queue.Queue[str] = queue.Queue()
        threading.Thread(target=lambda: [self._queue.put(line) for line in stream], daemon=True).start()

    def wait_for(self, pattern: str, seconds: float = 20) -> str:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            try:
                line = self._queue.get(timeout=0.1)
            except queue.Empty:
                continue
            self.seen.append(line)
            if re.search(pattern, line):
                return line
        raise AssertionError(f"no line matching {pattern!r} in {seconds}s; output:\n{''.join(self.seen)}")


@pytest.fixture
def clone(tmp_path: Path) -> Path:
    """A fresh clone of this repository's last commit, using this test run's virtual environment."""
    target = tmp_path / "clone"
    subprocess.run(["git", "clone", "--quiet", str(ROOT), str(target)], check=True)
    stamp = VENV / f".installed-{hashlib.sha256((target / 'pyproject.toml').read_bytes()).hexdigest()[:16]}"
    if not stamp.exists():
        pytest.skip(
            f"{VENV} was not made by bin/test for the committed pyproject.toml ({stamp.name} missing): "
            "run this test through bin/test after committing, so that bin/dev reuses it instead of installing"
        )
    return target


@pytest.mark.timeout(60)
@pytest.mark.skipif(
    WORKERS_MISSING,
    reason="workers.runner (the `intergiro-receiver worker` command) has not landed on this branch yet",
)
def test_bin_dev_in_a_fresh_clone_delivers_the_printed_send_command_to_the_sink_and_stops_clean(
    clone: Path,
) -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("REDIS_URL", "MERCHANT_WEBHOOK_URL")}
    receiver_port = free_port()
    env.update(INTERGIRO_VENV=str(VENV), RECEIVER_PORT=str(receiver_port), PYTHONUNBUFFERED="1")
    dev = subprocess.Popen(
        [str(clone / "bin" / "dev")], cwd=clone, env=env, text=True,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    try:
        assert dev.stdout is not None
        output = Lines(dev.stdout)
        redis_port = int(output.wait_for(r"^  redis +redis://127\.0\.0\.1:(\d+)").split(":")[2].split("/")[0])
        sink_port = int(
            output.wait_for(r"^  merchant +http://127\.0\.0\.1:(\d+)").split(":")[2].split("/")[0]
        )
        output.wait_for("^Send a signed test callback")
        command = output.wait_for(r"send card-ordered --url").strip()
        assert redis_port != 6379
        assert f"--url http://127.0.0.1:{receiver_port}/callbacks/intergiro" in command

        sent = subprocess.run(
            shlex.split(command), cwd=clone, env=env, capture_output=True, text=True, timeout=20
        )
        assert sent.returncode == 0, sent.stdout + sent.stderr
        assert sent.stdout.startswith("200 ") and '"accepted"' in sent.stdout

        delivered = output.wait_for(r"^sink: received SampleCard000001-0-order ")
        assert "status=ordered" in delivered and "signature ok" in delivered
    finally:
        os.killpg(dev.pid, signal.SIGINT)  # what Ctrl-C in a terminal does
        code = dev.wait(timeout=30)
    assert code == 0
    assert processes_in(clone) == []
    assert all(port_is_free(port) for port in (receiver_port, redis_port, sink_port))
    assert list((clone / ".dev" / "redis" / "appendonlydir").iterdir())  # the data stays, on disk

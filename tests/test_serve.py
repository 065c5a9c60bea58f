"""`intergiro-receiver serve` as an operator runs it: a real process, real Redis, a real token."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import real_callbacks
from tests.processes import free_port, is_running, serve_env, start_command, start_server, stop


@pytest.fixture
def served(redis_url: str, tmp_path: Path) -> Iterator[tuple[str, Path]]:
    port = free_port()
    log_path = tmp_path / "serve.log"
    process = start_server("serve", port=port, env=serve_env(redis_url, port), log=log_path, cwd=tmp_path)
    yield f"http://127.0.0.1:{port}", log_path
    stop(process)


def post(url: str, body: str, content_type: str) -> tuple[int, dict[str, Any]]:
    request = urllib.request.Request(
        url, data=body.encode(), method="POST", headers={"Content-Type": content_type}
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as answer:
            return answer.status, json.loads(answer.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def test_serve_accepts_a_real_intergiro_token_and_logs_json_lines_without_it(
    served: tuple[str, Path],
) -> None:
    base, log_path = served
    line = real_callbacks("order-jwt")[0]
    assert post(f"{base}/callbacks/intergiro", line["body"], line["content_type"])[0] == 200
    assert post(f"{base}/callbacks/intergiro", line["body"], line["content_type"])[1]["status"] == "duplicate"
    assert post(f"{base}/callbacks/intergiro", "x.y.z", "application/jwt")[0] == 400
    time.sleep(0.3)  # let the log lines reach the file
    records = [json.loads(text) for text in log_path.read_text().splitlines() if text.startswith("{")]
    outcomes = [r.get("outcome") for r in records if r.get("event") == "callback"]
    assert outcomes == ["accepted", "duplicate"]
    logged = log_path.read_text()
    signature = line["body"].split(".")[2]
    assert signature not in logged and line["body"].split(".")[1][:40] not in logged


def test_serve_with_two_processes_answers_on_one_port_from_two_pids_and_stops_together(
    redis_url: str, tmp_path: Path
) -> None:
    port = free_port()
    log_path = tmp_path / "serve.log"
    env = serve_env(redis_url, port)
    process = start_command("serve", "--processes", "2", env=env, log=log_path, cwd=tmp_path)
    try:
        pids: set[int] = set()
        deadline = time.monotonic() + 30
        while len(pids) < 2 and time.monotonic() < deadline:  # each request a new connection
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2) as answer:
                    pids.add(json.loads(answer.read())["pid"])
            except OSError:
                time.sleep(0.05)
        assert len(pids) == 2, log_path.read_text()
        children = Path(f"/proc/{process.pid}/task/{process.pid}/children").read_text().split()
        assert pids == {int(c) for c in children}
        line = real_callbacks("order-jwt")[0]
        assert (
            post(f"http://127.0.0.1:{port}/callbacks/intergiro", line["body"], line["content_type"])[0] == 200
        )
        for _ in range(6):  # whichever process answers, the counts are the processes' sum
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as answer:
                lines = answer.read().decode().splitlines()
            assert 'intergiro_callbacks_total{outcome="accepted"} 1.0' in lines
            assert "process_group_processes 3.0" in lines
        process.terminate()
        assert process.wait(15) == 0
        for pid in pids:
            assert not is_running(pid)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(10)


def test_serve_processes_stop_once_their_serve_command_is_sigkilled(redis_url: str, tmp_path: Path) -> None:
    port = free_port()
    process = start_command("serve", "--processes", "2", env=serve_env(redis_url, port),
                            log=tmp_path / "serve.log", cwd=tmp_path)  # fmt: skip
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2).close()
                break
            except OSError:
                time.sleep(0.05)
        children = [
            int(c) for c in Path(f"/proc/{process.pid}/task/{process.pid}/children").read_text().split()
        ]
        assert len(children) == 2
        process.kill()  # SIGKILL: it cannot pass a stop on to its processes
        process.wait(5)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and any(is_running(pid) for pid in children):
            time.sleep(0.1)
        assert not any(is_running(pid) for pid in children), "a receiver process outlived its serve command"
        with pytest.raises(OSError):  # nothing answers on the port any more
            urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2).close()
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(10)

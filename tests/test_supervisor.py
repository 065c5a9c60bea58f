"""The one supervisor of `serve --processes` and `worker --processes` (receiver/supervisor.py), on real
forked processes: a stop signal is passed on to each; receivers stand or fall together; workers end in
their own time and the set fails when one failed."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# Children by kind: `wait` runs until a stop signal (then writes its pid to the folder, the proof that
# it was stopped by one, and exits 0); `ok` exits 0 at once; `fail` exits 3 at once; `raise` raises.
SCRIPT = """
import asyncio, os, sys, time
from pathlib import Path
from receiver.logs import configure_logging
from receiver.supervisor import stop_signal, supervise

configure_logging()  # JSON lines on stderr, as the commands log

folder, together, kinds = Path(sys.argv[1]), sys.argv[2] == "together", sys.argv[3].split(",")

def child(kind):
    def run():
        if kind == "wait":
            async def main():
                stop = stop_signal()
                (folder / f"ready-{os.getpid()}").touch()  # ready once the stop signal is handled
                await stop.wait()
            asyncio.run(main())
            (folder / f"stopped-{os.getpid()}").touch()
            return 0
        if kind == "fail":
            return 3
        if kind == "raise":
            raise RuntimeError("boom")
        time.sleep(0.3)
        return 0
    return run

print("exit", supervise([child(k) for k in kinds], "test", together), flush=True)
"""


def start(tmp_path: Path, together: bool, *kinds: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-c", SCRIPT, str(tmp_path), "together" if together else "apart", ",".join(kinds)],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def finish(process: subprocess.Popen[str]) -> tuple[int, str]:
    out, err = process.communicate(timeout=30)
    assert process.returncode == 0, err
    [line] = [x for x in out.splitlines() if x.startswith("exit ")]
    return int(line.split()[1]), err


def wait_ready(tmp_path: Path, count: int) -> list[int]:
    deadline = time.monotonic() + 20
    while len(ready := list(tmp_path.glob("ready-*"))) < count:
        assert time.monotonic() < deadline, "the children did not start"
        time.sleep(0.05)
    return [int(p.name.split("-")[1]) for p in ready]


def stopped(tmp_path: Path) -> set[int]:
    return {int(p.name.split("-")[1]) for p in tmp_path.glob("stopped-*")}


def test_sigterm_to_the_supervisor_is_passed_on_and_each_child_finishes(tmp_path: Path) -> None:
    for together in (True, False):
        folder = tmp_path / str(together)
        folder.mkdir()
        process = start(folder, together, "wait", "wait")
        pids = wait_ready(folder, 2)
        os.kill(process.pid, signal.SIGTERM)
        assert finish(process)[0] == 0
        assert stopped(folder) == set(pids)


def test_receivers_stand_together_one_ending_on_its_own_stops_the_others_and_fails_the_set(
    tmp_path: Path,
) -> None:
    process = start(tmp_path, True, "wait", "wait", "ok")
    code, err = finish(process)
    assert code == 1 and "ended on its own; stopping the others" in err
    assert len(stopped(tmp_path)) == 2


def test_workers_end_in_their_own_time_and_the_set_fails_only_when_one_failed(tmp_path: Path) -> None:
    assert finish(start(tmp_path, False, "ok", "ok"))[0] == 0  # a burst run: each ends when done
    assert finish(start(tmp_path, False, "ok", "fail"))[0] == 1
    code, err = finish(start(tmp_path, False, "ok", "raise"))
    assert code == 1 and "test process failed" in err and "boom" in err
    # one failing does not stop the others: the waiting one runs on until it is stopped
    process = start(tmp_path, False, "wait", "fail")
    [pid] = wait_ready(tmp_path, 1)
    time.sleep(0.5)
    assert process.poll() is None and pid not in stopped(tmp_path)
    os.kill(process.pid, signal.SIGTERM)
    assert finish(process)[0] == 1 and pid in stopped(tmp_path)

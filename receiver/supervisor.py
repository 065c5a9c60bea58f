"""Processes and signals: the forked set that `serve --processes N` and `worker --processes N` run as,
supervised by the command's own process, and the stop signals every long-running command waits for.

A forked child watches the process that forked it: once that parent is gone (SIGKILLed, say, so it
could not pass a stop on), the child stops itself as a SIGTERM would stop it, finishing what it has in
hand, instead of serving on, unmanaged, beside whatever the supervisor starts next.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Sequence
from types import FrameType

from receiver.logs import log

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
PARENT_CHECK_SECONDS = 1.0


def stop_signal(*also: signal.Signals) -> asyncio.Event:
    """An event set by SIGTERM or SIGINT (and the signals `also` names), through the running loop's
    handlers: what a server or a periodic command waits for."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signal_number in (*STOP_SIGNALS, *also):
        loop.add_signal_handler(signal_number, stop.set)
    return stop


def stopped_within(seconds: float) -> bool:
    """Wait `seconds` (in a process without an event loop); True when SIGTERM or SIGINT came meanwhile,
    which ends the wait at once."""
    stopped = threading.Event()

    def stop(signal_number: int, frame: FrameType | None) -> None:
        stopped.set()

    for signal_number in STOP_SIGNALS:
        signal.signal(signal_number, stop)
    return stopped.wait(seconds)


def stop_with_parent(parent: int, every: float = PARENT_CHECK_SECONDS) -> threading.Thread:
    """In a forked child of `parent` (its pid, taken before the fork): a daemon thread that sends this
    process SIGTERM once its parent is no longer `parent`."""

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(every)
        os.kill(os.getpid(), signal.SIGTERM)

    thread = threading.Thread(target=watch, name="parent-watch", daemon=True)
    thread.start()
    return thread


def supervise(children: Sequence[Callable[[], int]], what: str, together: bool) -> int:
    """Fork one process per function (call it before this process opens an event loop or a connection,
    so that none is shared), each watching this one, and wait for them all; returns the exit code.

    SIGTERM or SIGINT received here is passed on to each, which finishes what it has in hand. `together`
    (the receivers): the processes live and stop as one, so one that ends on its own, however, stops
    the others and the set exits 1 (the supervisor above restarts the whole set). Otherwise (the
    workers: a burst worker ends when its queue is empty) each ends in its own time, and the set exits
    1 when any failed."""
    parent = os.getpid()
    pids: set[int] = set()
    for run in children:
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the child's coverage is not collected
            os._exit(_child(run, parent, what))
        pids.add(pid)
    stopping = False

    def stop_all(signal_number: int, frame: FrameType | None) -> None:
        nonlocal stopping
        stopping = True
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal_number)

    for signal_number in STOP_SIGNALS:
        signal.signal(signal_number, stop_all)
    failed = False
    while pids:
        try:
            pid, status = os.wait()
        except ChildProcessError:
            break
        if pid not in pids:
            continue
        pids.discard(pid)
        if os.waitstatus_to_exitcode(status) != 0:
            failed = True
        elif together and not stopping:
            failed = True
        if together and failed and not stopping:
            log.error(f"{what} process ended on its own; stopping the others", pid=pid)
            stop_all(signal.SIGTERM, None)
    return 1 if failed else 0


def _child(run: Callable[[], int], parent: int, what: str) -> int:
    """Run one forked child; its exit code."""
    code = 1
    try:
        stop_with_parent(parent)
        code = run()
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 0 if exc.code is None else 1
    except BaseException:
        log.exception(f"{what} process failed")
    finally:
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                stream.flush()
    return code

"""A forked process's watch on the process that forked it (`serve --processes N`, `worker` with more
than one process): once that parent is gone (SIGKILLed, say, so it could not pass a stop on), the child
stops itself as a SIGTERM would stop it, finishing what it has in hand, instead of serving on,
unmanaged, beside whatever the supervisor starts next."""

from __future__ import annotations

import os
import signal
import threading
import time

PARENT_CHECK_SECONDS = 1.0


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

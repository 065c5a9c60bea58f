"""DeliveryWorker: RQ's in-process worker, configured through what RQ offers for that.

What it sets: the job's death penalty and heartbeat, both derived from DELIVERY_TIMEOUT_SECONDS (so a
dead worker's attempt counts as abandoned soon, not after RQ's 300 s job timeout); how long one wait for
a job lasts; and, for the runner, whether the loop ended on purpose. Everything RQ records about a job
(its start, success, failure, retry) is RQ's own code: the delivery's own steps are the job's
(workers/delivery.py) and its returned `Retry` or raised DeadLettered, and the repairs RQ leaves to
others are workers/maintenance.py's.

Worker class: `SimpleWorker` (jobs run in the worker process; no fork per job). A delivery is a short
I/O-bound call that needs no isolation from the worker, and a long-lived process keeps its HTTP
connection to the merchant alive between deliveries. What forking would protect against (a job that
crashes or leaks) is covered by crash recovery (workers/maintenance.py).
"""

from __future__ import annotations

import math
from types import FrameType
from typing import Any

from rq import Queue, SimpleWorker
from rq.job import Job
from rq.timeouts import UnixSignalDeathPenalty

from receiver.settings import Settings

# How long one BLMOVE waits for a job: under the workers' socket timeout (10 s, DeliveryContext), or each
# idle wait would end in a TimeoutError that RQ answers with a growing pause (up to a minute).
DEQUEUE_WAIT_SECONDS = 5


def attempt_timeout_seconds(config: Settings | float) -> int:
    """How long one attempt may run: a POST's connect + read timeouts (DELIVERY_TIMEOUT_SECONDS, or a
    destination's own) plus a handler's share, and slack."""
    timeout = config.delivery_timeout_seconds if isinstance(config, Settings) else config
    return math.ceil(2 * timeout) + 2


def attempt_death_penalty(seconds: int) -> type[UnixSignalDeathPenalty]:
    """RQ's death penalty (its `death_penalty_class`), never longer than one attempt may run."""

    class AttemptDeathPenalty(UnixSignalDeathPenalty):
        def __init__(self, timeout: Any, exception: Any = None, **kwargs: Any) -> None:
            bounded = seconds if timeout is None or timeout < 0 else min(timeout, seconds)
            super().__init__(bounded, exception, **kwargs)  # type: ignore[no-untyped-call]

    return AttemptDeathPenalty


class DeliveryWorker(SimpleWorker):
    """SimpleWorker whose job heartbeat lasts one attempt (its death penalty's bound) and a little."""

    attempt_timeout = 300
    stop_requested = False  # SIGTERM or SIGINT: RQ's loop ends on purpose
    drained = False  # burst mode found the queue empty

    def get_heartbeat_ttl(self, job: Job, working_time: float = 0.0) -> int:
        return self.attempt_timeout + 2

    def request_stop(self, signum: int, frame: FrameType | None) -> None:
        self.stop_requested = True
        super().request_stop(signum, frame)  # type: ignore[no-untyped-call]

    def dequeue_job_and_maintain_ttl(
        self, timeout: int | None, max_idle_time: int | None = None
    ) -> tuple[Job, Queue] | None:
        result = super().dequeue_job_and_maintain_ttl(timeout, max_idle_time)
        self.drained = result is None
        return result

    @property
    def dequeue_timeout(self) -> int:
        return DEQUEUE_WAIT_SECONDS

    def stop_listening(self) -> None:
        """Stop the command-channel thread RQ's teardown did not reach (it would run on for good)."""
        if self.pubsub_thread is not None:
            self.pubsub_thread.stop()
            self.pubsub_thread.join(timeout=1)

    @property
    def ended_on_purpose(self) -> bool:
        return self.stop_requested or self.drained

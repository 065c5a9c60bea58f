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

Disk flushes: with `appendfsync always` (deploy/redis.conf) Redis flushes the append-only file before it
answers any round trip that wrote, so a worker's rate is bounded by its writing round trips per job as
much as by its CPU. RQ's loop refreshes the worker's heartbeat four times per job (three of them as three
separate commands) and sets its state to idle twice, each a round trip of its own; DeliveryWorker
sends a heartbeat as one pipeline and refreshes it at most once a second (the key lives `worker_ttl` +
60 s, and every job's preparation extends it anyway), writes a state only when it changes, and sets
itself idle in the transaction in which RQ ends the job's execution (as RQ sets it busy in the one that
starts it). Its jobs (DeliveryJob) count the delivery attempt in the transaction in which RQ records
the job started. All through RQ's public methods and their `pipeline` arguments (`heartbeat`,
`set_state`, `cleanup_execution`, `Job.prepare_for_execution`): what RQ records, and when, stays RQ's.
docs/performance.md measures what each gives.
"""

from __future__ import annotations

import math
import time
from types import FrameType
from typing import Any

from redis import Redis
from redis.client import Pipeline
from rq import Queue, SimpleWorker
from rq.executions import Execution
from rq.job import Job
from rq.serializers import JSONSerializer
from rq.timeouts import UnixSignalDeathPenalty
from rq.worker import WorkerStatus

from receiver.settings import Settings
from workers.delivery import count_attempt_commands, current_context

# How long one BLMOVE waits for a job: under the workers' socket timeout (10 s, DeliveryContext), or each
# idle wait would end in a TimeoutError that RQ answers with a growing pause (up to a minute).
DEQUEUE_WAIT_SECONDS = 5
# How often RQ's periodic heartbeat (no timeout given) is sent while jobs follow one another.
HEARTBEAT_REFRESH_SECONDS = 1.0


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


class DeliveryJob(Job):
    """RQ's Job, whose preparation for execution (RQ's `prepare_for_execution`, on the transaction in which
    RQ records the job started) also counts the delivery attempt, so that the attempt's own start only
    reads (workers.delivery.DeliveryContext.start_attempt). A plain `rq worker` runs RQ's Job, and the
    attempt counts itself there."""

    attempt_counted = False

    def prepare_for_execution(self, worker_name: str, pipeline: Pipeline) -> None:
        super().prepare_for_execution(worker_name, pipeline)
        count_attempt_commands(pipeline, current_context().keys, self.id)
        self.attempt_counted = True


class DeliveryWorker(SimpleWorker):
    """SimpleWorker whose job heartbeat lasts one attempt (its death penalty's bound) and a little."""

    job_class = DeliveryJob
    attempt_timeout = 300
    stop_requested = False  # SIGTERM or SIGINT: RQ's loop ends on purpose
    drained = False  # burst mode found the queue empty

    refreshed_at = -math.inf  # time.monotonic() of the last periodic heartbeat sent

    def get_heartbeat_ttl(self, job: Job, working_time: float = 0.0) -> int:
        return self.attempt_timeout + 2

    def heartbeat(self, timeout: int | None = None, pipeline: Pipeline | None = None) -> None:
        """RQ's heartbeat. The periodic one (no `timeout`) is skipped when one was sent less than
        HEARTBEAT_REFRESH_SECONDS ago; one sent on its own goes as a single round trip."""
        if timeout is None:
            if time.monotonic() - self.refreshed_at < HEARTBEAT_REFRESH_SECONDS:
                return
            self.refreshed_at = time.monotonic()
        if pipeline is not None:
            super().heartbeat(timeout, pipeline=pipeline)  # type: ignore[no-untyped-call]
            return
        with self.connection.pipeline(transaction=False) as own:
            super().heartbeat(timeout, pipeline=own)  # type: ignore[no-untyped-call]
            own.execute()

    def set_state(self, state: str, pipeline: Pipeline | None = None) -> None:
        """RQ's set_state, except that a state the worker is already in is not written again (RQ sets
        idle after each job and again before each wait for the next)."""
        if pipeline is None and state == self.get_state():
            return
        super().set_state(state, pipeline=pipeline)  # type: ignore[no-untyped-call]

    def cleanup_execution(self, job: Job, pipeline: Pipeline, execution: Execution | None = None) -> None:
        """RQ's end of an execution, and the worker idle again in the same transaction: the mirror of
        RQ's start of one, which sets it busy in its own (rq.executions.prepare_execution)."""
        super().cleanup_execution(job, pipeline=pipeline, execution=execution)  # type: ignore[no-untyped-call]
        self.set_state(WorkerStatus.IDLE, pipeline=pipeline)

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


def delivery_worker(queue: Queue, connection: Redis, attempt_seconds: int) -> DeliveryWorker:
    """A DeliveryWorker on `queue` (RQ's JSON serializer), its job heartbeat and death penalty bounded by
    one attempt of `attempt_seconds` (attempt_timeout_seconds)."""
    worker = DeliveryWorker([queue], connection=connection, serializer=JSONSerializer, worker_ttl=60)
    worker.attempt_timeout = attempt_seconds
    worker.death_penalty_class = attempt_death_penalty(attempt_seconds)
    return worker

"""`intergiro-receiver worker`: RQ workers that deliver updates, one process each, plus in every process
a maintenance thread that moves due retries back to the queue, re-queues attempts of dead workers and
releases stale order heads.

Worker class: `SimpleWorker` (jobs run in the worker process; no fork per job). A delivery is a short
I/O-bound call that needs no isolation from the worker, and a long-lived process keeps its HTTP
connections to the merchant alive between deliveries: about 300 jobs/s per process against about 90
for RQ's fork-per-job `Worker`. What forking would protect against (a job that crashes or leaks) is
covered by crash recovery: a dead worker's attempt is re-queued from RQ's StartedJobRegistry.
"""

from __future__ import annotations

import logging
import math
import multiprocessing
import os
import signal
import sys
import threading
import time
from types import FrameType
from typing import Any

from redis.exceptions import RedisError
from rq import Queue, SimpleWorker
from rq.job import Job
from rq.registry import StartedJobRegistry
from rq.serializers import JSONSerializer
from rq.utils import now

from receiver.connections import sync_redis
from receiver.logs import configure_logging, log
from receiver.rqstore import DELIVER_UPDATE, RQ_RECOVERIES, job_key
from receiver.settings import Settings
from workers.delivery import (
    DeliveryContext,
    TargetNotConfigured,
    attempt_start,
    build_targets,
    current_context,
    start_attempt_commands,
    use_context,
)

STALE_HEAD_SWEEP_SECONDS = 30.0
MAX_SCHEDULER_SLEEP_SECONDS = 1.0
MAX_RESTART_PAUSE_SECONDS = 10.0
# How long one BLMOVE waits for a job: under the workers' socket timeout (10 s, DeliveryContext), or each
# idle wait would end in a TimeoutError that RQ answers with a growing pause (up to a minute).
DEQUEUE_WAIT_SECONDS = 5


def job_timeout_seconds(settings: Settings) -> int:
    """How long one attempt may run: a POST's connect + read timeouts plus a handler's share, and slack."""
    return math.ceil(2 * settings.delivery_timeout_seconds) + 2


class DeliveryWorker(SimpleWorker):
    """RQ's in-process worker, with the job timeout (and so the time after which a dead worker's
    attempt counts as abandoned) derived from DELIVERY_TIMEOUT_SECONDS instead of the job's 300 s."""

    job_timeout = 300
    stop_requested = False  # SIGTERM or SIGINT: RQ's loop ends on purpose
    drained = False  # burst mode found the queue empty

    def request_stop(self, signum: int, frame: FrameType | None) -> None:
        self.stop_requested = True
        super().request_stop(signum, frame)  # type: ignore[no-untyped-call]

    def dequeue_job_and_maintain_ttl(
        self, timeout: int | None, max_idle_time: int | None = None
    ) -> tuple[Job, Queue] | None:
        result = super().dequeue_job_and_maintain_ttl(timeout, max_idle_time)
        self.drained = result is None
        return result

    def stop_listening(self) -> None:
        """Stop the command-channel thread RQ's teardown did not reach (it would run on for good)."""
        if self.pubsub_thread is not None:
            self.pubsub_thread.stop()
            self.pubsub_thread.join(timeout=1)

    @property
    def dequeue_timeout(self) -> int:
        return DEQUEUE_WAIT_SECONDS

    @property
    def ended_on_purpose(self) -> bool:
        return self.stop_requested or self.drained

    def execute_job(self, job: Job, queue: Queue) -> None:
        job.timeout = self.job_timeout
        if job.retries_left is not None and job.retries_left < RQ_RECOVERIES:
            forget_dead_executions(job)  # only a job re-queued after its worker died has any
        super().execute_job(job, queue)

    def get_heartbeat_ttl(self, job: Job, working_time: float = 0.0) -> int:
        return self.job_timeout + 2

    def increment_successful_job_count(self, pipeline: Any = None) -> None:
        """RQ calls this inside the transaction that records a job's success (retried as a whole when
        the job's dependents change): a delivered update is finished in that same transaction."""
        super().increment_successful_job_count(pipeline)
        context = current_context()
        if pipeline is not None:
            for update, counters in context.finish_with_job or ():
                context.chains.finish_in(pipeline, update, counters)

    def handle_job_success(self, job: Job, queue: Queue, started_job_registry: Any, execution: Any) -> None:
        context = current_context()
        try:
            super().handle_job_success(job, queue, started_job_registry, execution)
        except Exception:
            # RQ's bookkeeping failed (RQ 3.0 can fail reading a stale execution before its transaction
            # runs): the merchant has the update all the same, so finish it now, or the job RQ runs
            # again would POST it again. A finish that did commit is not repeated (receiver.chains.FINISH).
            for update, counters in context.finish_with_job or ():
                context.chains.finish(update, counters=counters)
            raise
        finally:
            context.finish_with_job = None

    def prepare_job_execution(self, job: Job, remove_from_intermediate_queue: bool = False) -> None:
        """RQ 3.0's preparation of a job (restated: RQ sends it as one transaction and keeps no answer),
        with the start of the delivery attempt in the same transaction, one round trip fewer per job."""
        context = current_context()
        context.finish_with_job = None
        update = job.args[0] if job.func_name == DELIVER_UPDATE and job.args else None
        if not isinstance(update, dict):
            super().prepare_job_execution(job, remove_from_intermediate_queue)
            return
        with self.connection.pipeline() as pipeline:
            heartbeat_ttl = self.get_heartbeat_ttl(job)
            self.heartbeat(heartbeat_ttl, pipeline=pipeline)
            job.heartbeat(now(), heartbeat_ttl, pipeline=pipeline)
            job.prepare_for_execution(self.name, pipeline=pipeline)
            pipeline.persist(job.key)
            if remove_from_intermediate_queue:
                queue = Queue(job.origin, connection=self.connection)
                pipeline.lrem(queue.intermediate_queue_key, 1, job.id)
            start_attempt_commands(pipeline, context.keys, update)
            answers = pipeline.execute()
        context.prepared = attempt_start(update, answers[-3:])
        context.finish_with_job = []
        self.procline(f"Processing {job.func_name} from {job.origin} since {time.time()}")  # type: ignore[no-untyped-call]


def forget_dead_executions(job: Job) -> None:
    """Drop the executions of dead workers from the job's execution registry.

    RQ 3.0 keeps an execution's id in the job's registry 60 s longer than the execution's own hash; a
    job re-queued after its worker died and finished within that minute then fails in RQ's cleanup
    ("Execution ... not found in Redis") and RQ runs it again and again.
    """
    registry = job.execution_registry
    connection = registry.connection
    for raw in connection.zrange(registry.key, 0, -1):
        execution_id = raw.decode() if isinstance(raw, bytes) else str(raw)
        if not connection.exists(f"rq:execution:{job.id}:{execution_id}"):
            connection.zrem(registry.key, execution_id)


# KEYS: RQ's intermediate queue, the RQ queue, the job. ARGV: job id.
# A job RQ moved off the queue (BLMOVE into its intermediate list) whose worker lost Redis before starting
# it (a failover between the two steps) is on no list a worker reads; RQ itself retries it only after
# ten minutes at the soonest. Put it back on the queue, in one step so it is never on both lists or on
# neither; unless RQ already re-queued it (it is on the queue again) or it has run since.
REQUEUE_UNSTARTED = """
if redis.call('LREM', KEYS[1], 1, ARGV[1]) == 0 then return 0 end
if redis.call('HGET', KEYS[3], 'status') ~= 'queued' or redis.call('LPOS', KEYS[2], ARGV[1]) then return 0 end
redis.call('RPUSH', KEYS[2], ARGV[1])
return 1
"""


class Maintenance(threading.Thread):
    """Moves due retries to the queue, recovers attempts of dead workers, releases stale heads."""

    def __init__(self, context: DeliveryContext, queue_name: str, recovery_seconds: float) -> None:
        super().__init__(name="delivery-maintenance", daemon=True)
        self.chains = context.chains
        self.redis = sync_redis(context.settings, timeout=10)
        self.queue = Queue(queue_name, connection=self.redis, serializer=JSONSerializer)
        self.recovery_seconds = recovery_seconds
        self.stopping = threading.Event()
        self._requeue_unstarted = self.redis.register_script(REQUEUE_UNSTARTED)
        self._unstarted: dict[str, float] = {}  # job id -> since when this thread saw it unstarted
        self._last_unstarted_check = 0.0

    def run(self) -> None:
        next_recovery = next_sweep = 0.0
        while not self.stopping.is_set():
            sleep = MAX_SCHEDULER_SLEEP_SECONDS
            try:
                moved, next_due = self.chains.move_due()
                if moved:
                    log.debug("retries queued", count=moved)
                if next_due is not None:
                    sleep = min(sleep, max(0.01, next_due - time.time()))
                now = time.monotonic()
                if now >= next_recovery:
                    self.recover_abandoned()
                    if self.requeue_unstarted():
                        log.warning("jobs taken off the queue but never started were queued again")
                    next_recovery = now + self.recovery_seconds
                if now >= next_sweep:
                    released = self.chains.release_stale_heads()
                    if released:
                        log.warning("stale order heads released", count=released)
                    next_sweep = now + STALE_HEAD_SWEEP_SECONDS
            except RedisError as exc:
                log.warning("maintenance could not reach Redis", error=str(exc))
                sleep = MAX_SCHEDULER_SLEEP_SECONDS
            self.stopping.wait(sleep)

    def requeue_unstarted(self) -> int:
        """Re-queue jobs that sat in RQ's intermediate list, not started, through consecutive checks
        spanning `recovery_seconds` (a live worker starts a job it took within milliseconds)."""
        now = time.monotonic()
        consecutive = now - self._last_unstarted_check <= 2 * self.recovery_seconds + 1
        self._last_unstarted_check = now
        started = {
            _text(m).rpartition(":")[0] for m in self.redis.zrange(self.queue.started_job_registry.key, 0, -1)
        }
        waiting = {_text(i) for i in self.redis.lrange(self.queue.intermediate_queue_key, 0, -1)} - started
        self._unstarted = {i: self._unstarted.get(i, now) if consecutive else now for i in waiting}
        moved = 0
        for job_id, since in list(self._unstarted.items()):
            if now - since >= self.recovery_seconds:
                keys = [self.queue.intermediate_queue_key, self.queue.key, job_key(job_id)]
                moved += int(self._requeue_unstarted(keys=keys, args=[job_id]))
                del self._unstarted[job_id]
        return moved

    def recover_abandoned(self) -> None:
        """Re-queue attempts whose worker died (RQ does it for jobs with retries left; see jobs.py).
        RQ's maintenance lock keeps two processes from re-queueing the same job; we take it with a short
        expiry, so a worker killed while holding it does not stop recovery for RQ's usual 15 minutes."""
        lock = self.queue.registry_cleaning_key
        if not self.redis.set(lock, 1, nx=True, ex=math.ceil(self.recovery_seconds) + 5):
            return
        try:
            StartedJobRegistry(self.queue.name, connection=self.redis, serializer=JSONSerializer).cleanup()
        finally:
            self.redis.delete(lock)


def work(settings: Settings, burst: bool) -> int:
    """One worker process: deliver until stopped (or, with burst, until the queue is empty)."""
    configure_logging(settings.log_format, settings.log_level)
    try:
        context = DeliveryContext.create(settings)
    except TargetNotConfigured as exc:
        print(f"intergiro-receiver worker: {exc}", file=sys.stderr)
        return 1
    use_context(context)
    timeout = job_timeout_seconds(settings)
    maintenance = Maintenance(context, settings.queue_name, recovery_seconds=max(1.0, timeout / 2))
    queue = Queue(settings.queue_name, connection=context.redis, serializer=JSONSerializer)
    if burst:
        maintenance.chains.move_due()
        maintenance.recover_abandoned()
    maintenance.start()
    rq_level = "DEBUG" if settings.log_level == "DEBUG" else "WARNING"
    log.info("worker starting", queue=settings.queue_name, pid=os.getpid(), burst=burst)
    pause = 1.0
    try:
        while True:
            worker: DeliveryWorker | None = None
            try:  # RQ reaches Redis already in the constructor, and again in its teardown
                worker = DeliveryWorker(
                    [queue], connection=context.redis, serializer=JSONSerializer, worker_ttl=60
                )
                worker.job_timeout = timeout
                worker.work(burst=burst, logging_level=rq_level, with_scheduler=False)
            except RedisError as exc:
                log.warning("worker cannot reach Redis", error=str(exc))
                if worker is not None:
                    worker.stop_listening()
            if (worker is not None and worker.ended_on_purpose) or not pause_before_restart(pause):
                break
            pause = min(pause * 2, MAX_RESTART_PAUSE_SECONDS)
    finally:
        maintenance.stopping.set()
    return 0


def pause_before_restart(seconds: float) -> bool:
    """RQ's loop retries Redis only while it waits for a job: a Redis error anywhere else (a failover in
    the middle of a delivery, a heartbeat) ends it, and the process would exit with updates still queued.
    So the loop is started again, as a new RQ worker, after a pause; False when SIGTERM/SIGINT came."""
    log.warning("worker loop ended on a Redis error; starting it again", retry_in=seconds)
    stopped = threading.Event()

    def stop(signum: int, frame: FrameType | None) -> None:
        stopped.set()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    return not stopped.wait(seconds)


def _child(settings: Settings, burst: bool) -> None:
    raise SystemExit(work(settings, burst))


def run_workers(settings: Settings, burst: bool = False, processes: int = 1) -> int:
    """Start `processes` worker processes (or work in this one) and wait for them; 1 when any failed."""
    try:
        build_targets(settings)  # refuse to start, with one line, before forking anything
    except TargetNotConfigured as exc:
        print(f"intergiro-receiver worker: {exc}", file=sys.stderr)
        return 1
    if processes < 1:
        print("intergiro-receiver worker: --processes must be 1 or more", file=sys.stderr)
        return 1
    if processes == 1:
        return work(settings, burst)
    logging.getLogger("rq").setLevel(logging.WARNING)
    fork = multiprocessing.get_context("fork")
    children = [
        fork.Process(target=_child, args=(settings, burst), name=f"worker-{n}") for n in range(processes)
    ]
    for child in children:
        child.start()

    def forward(signum: int, frame: FrameType | None) -> None:
        for child in children:
            if child.pid is not None and child.is_alive():
                os.kill(child.pid, signum)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    for child in children:
        child.join()
    return 1 if any(child.exitcode for child in children) else 0


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else value

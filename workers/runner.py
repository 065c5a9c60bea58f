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

from redis import Redis
from redis.exceptions import RedisError
from rq import Queue, SimpleWorker
from rq.exceptions import StopRequested
from rq.job import Job
from rq.registry import StartedJobRegistry
from rq.serializers import JSONSerializer

from receiver.connections import sync_redis
from receiver.logs import configure_logging, log
from receiver.settings import Settings
from workers.delivery import DeliveryContext, TargetNotConfigured, build_targets, use_context

STALE_HEAD_SWEEP_SECONDS = 30.0
MAX_SCHEDULER_SLEEP_SECONDS = 1.0
REDIS_WAIT_SECONDS = 0.5
UNSTARTED_GRACE_SECONDS = 10.0


def job_timeout_seconds(settings: Settings) -> int:
    """How long one attempt may run: a POST's connect + read timeouts plus a handler's share, and slack."""
    return math.ceil(2 * settings.delivery_timeout_seconds) + 2


class DeliveryWorker(SimpleWorker):
    """RQ's in-process worker, with the job timeout (and so the time after which a dead worker's
    attempt counts as abandoned) derived from DELIVERY_TIMEOUT_SECONDS instead of the job's 300 s."""

    job_timeout = 300

    def execute_job(self, job: Job, queue: Queue) -> None:
        job.timeout = self.job_timeout
        forget_dead_executions(job)
        super().execute_job(job, queue)

    def get_heartbeat_ttl(self, job: Job, working_time: float = 0.0) -> int:
        return self.job_timeout + 2

    @property
    def stop_requested(self) -> bool:
        """Whether SIGTERM or SIGINT ended the loop (RQ notes the time of the request)."""
        return self._shutdown_requested_date is not None


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


class Maintenance(threading.Thread):
    """Moves due retries to the queue, recovers attempts of dead workers, releases stale heads."""

    def __init__(self, context: DeliveryContext, queue_name: str, recovery_seconds: float) -> None:
        super().__init__(name="delivery-maintenance", daemon=True)
        self.chains = context.chains
        self.redis = sync_redis(context.settings, timeout=10)
        self.queue = Queue(queue_name, connection=self.redis, serializer=JSONSerializer)
        self.recovery_seconds = recovery_seconds
        self.stopping = threading.Event()
        self.taken_since: dict[str, float] = {}  # update id -> when first seen taken and not started

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

    def recover_abandoned(self) -> None:
        """Re-queue attempts whose worker died (RQ does it for jobs with retries left; see jobs.py).
        RQ's maintenance lock keeps two processes from re-queueing the same job; we take it with a short
        expiry, so a worker killed while holding it does not stop recovery for RQ's usual 15 minutes."""
        lock = self.queue.registry_cleaning_key
        if not self.redis.set(lock, 1, nx=True, ex=math.ceil(self.recovery_seconds) + 5):
            return
        try:
            StartedJobRegistry(self.queue.name, connection=self.redis, serializer=JSONSerializer).cleanup()
            self.recover_unstarted()
        finally:
            self.redis.delete(lock)

    def recover_unstarted(self) -> None:
        """Re-queue updates a worker took from the queue but never started (it or Redis died between
        the two steps). A live worker starts a job milliseconds after taking it, so only ids seen taken
        for UNSTARTED_GRACE_SECONDS count; RQ's own check would take 10 minutes or more."""
        now = time.monotonic()
        self.taken_since = {i: self.taken_since.get(i, now) for i in self.chains.taken_not_started()}
        for update_id, since in list(self.taken_since.items()):
            if now - since >= UNSTARTED_GRACE_SECONDS:
                del self.taken_since[update_id]
                if self.chains.recover_unstarted(update_id):
                    log.warning("update taken but never started put back on the queue", update=update_id)


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
    try:
        while True:
            worker = DeliveryWorker(
                [queue], connection=context.redis, serializer=JSONSerializer, worker_ttl=60
            )
            worker.job_timeout = timeout
            try:
                worker.work(burst=burst, logging_level=rq_level, with_scheduler=False)
            except RedisError as exc:  # RQ's own teardown could not reach Redis either
                log.warning("worker could not register its end", error=str(exc))
            if burst or worker.stop_requested:
                break
            # RQ's loop ends the worker on any error, and losing Redis (a restart, a failover) is one
            # that hits every worker at once: all would quit and nothing be delivered until someone
            # restarted them. The attempt in hand stays in StartedJobRegistry and is re-queued after
            # its timeout like a dead worker's; this process waits for Redis and works again.
            log.warning("worker loop ended without a stop request; starting again once Redis answers")
            wait_for_redis(context.redis)
    except StopRequested:  # SIGTERM while waiting for Redis (RQ's handler raises it when idle)
        pass
    finally:
        maintenance.stopping.set()
    return 0


def wait_for_redis(redis: Redis) -> None:
    while True:
        try:
            redis.ping()
            return
        except RedisError:
            time.sleep(REDIS_WAIT_SECONDS)


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

"""What RQ leaves to others, done in every worker process by one thread: queue the retries that are
due, recover attempts of dead workers, and move orders on past jobs deleted from outside.

- Due retries: an update waiting for its next attempt is a job RQ holds as scheduled (its
  ScheduledJobRegistry, whole seconds); it is queued at its due time to the microsecond
  (receiver.retries.MOVE_DUE). An RQ scheduler, if one runs (`rq worker --with-scheduler`), may queue it
  too, never sooner.
- Dead workers: RQ's own StartedJobRegistry.cleanup() finds their jobs and, as the jobs have no RQ
  retries, records them failed; every failed job whose update is still its order's head and not
  dead-lettered is then put back on the queue with RQ's FailedJobRegistry.requeue(). A failed job whose
  update was delivered (RQ failed to record the success) is removed: the merchant has it.
- Jobs RQ took off the queue for a worker that lost Redis before starting them are queued again.
- Jobs deleted from outside: a head whose job is gone is dead-lettered with the reason and its order
  moves on (receiver.chains.RELEASE_STALE; a waiting update whose job is gone is found as its order
  advances).
"""

from __future__ import annotations

import threading
import time

from redis.exceptions import RedisError
from rq import Queue
from rq.exceptions import InvalidJobOperation, NoSuchJobError
from rq.executions import Execution
from rq.job import Job
from rq.registry import FailedJobRegistry, StartedJobRegistry
from rq.serializers import JSONSerializer

from receiver.chains import read_head, read_pending
from receiver.connections import sync_redis
from receiver.deadletters import read_dead_lettered
from receiver.logs import log
from receiver.redistext import text
from receiver.rqstore import job_key
from workers.delivery import DeliveryContext

STALE_HEAD_SWEEP_SECONDS = 30.0
MAX_SCHEDULER_SLEEP_SECONDS = 1.0
# A due retry whose attempt RQ has not recorded yet is looked at again this soon.
OVERDUE_POLL_SECONDS = 0.02

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
        self.retries = context.retries
        self.keys = context.keys
        self.redis = sync_redis(context.settings, timeout=10)
        self.queue = Queue(queue_name, connection=self.redis, serializer=JSONSerializer)
        self.failed = FailedJobRegistry(queue_name, connection=self.redis, serializer=JSONSerializer)
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
                moved, next_due = self.retries.move_due()
                if moved:
                    log.debug("retries queued", count=moved)
                if next_due is not None:
                    sleep = min(sleep, max(OVERDUE_POLL_SECONDS, next_due - time.time()))
                now = time.monotonic()
                if now >= next_recovery:
                    self.recover_abandoned()
                    if self.requeue_unstarted():
                        log.warning("jobs taken off the queue but never started were queued again")
                    next_recovery = now + self.recovery_seconds
                if now >= next_sweep:
                    released = self.chains.release_stale_heads()
                    if released:
                        log.warning("orders moved on past jobs deleted from outside", count=released)
                    next_sweep = now + STALE_HEAD_SWEEP_SECONDS
            except RedisError as exc:
                log.warning("maintenance could not reach Redis", error=str(exc))
                sleep = MAX_SCHEDULER_SLEEP_SECONDS
            except Exception:
                log.exception("maintenance step failed; trying again")
                sleep = MAX_SCHEDULER_SLEEP_SECONDS
            self.stopping.wait(sleep)

    def requeue_unstarted(self) -> int:
        """Re-queue jobs that sat in RQ's intermediate list, not started, through consecutive checks
        spanning `recovery_seconds` (a live worker starts a job it took within milliseconds)."""
        now = time.monotonic()
        consecutive = now - self._last_unstarted_check <= 2 * self.recovery_seconds + 1
        self._last_unstarted_check = now
        registry = self.queue.started_job_registry
        started = {job_id for job_id, _execution in registry.get_job_and_execution_ids(cleanup=False)}
        waiting = set(self.queue.intermediate_queue.get_job_ids()) - started
        self._unstarted = {i: self._unstarted.get(i, now) if consecutive else now for i in waiting}
        moved = 0
        for job_id, since in list(self._unstarted.items()):
            if now - since >= self.recovery_seconds:
                keys = [self.queue.intermediate_queue_key, self.queue.key, job_key(job_id)]
                moved += int(self._requeue_unstarted(keys=keys, args=[job_id]))
                del self._unstarted[job_id]
        return moved

    def recover_abandoned(self) -> int:
        """RQ's cleanup of its StartedJobRegistry (records dead workers' jobs failed), then the failed
        jobs whose update is still its order's head, not dead-lettered, back on the queue. RQ's own
        maintenance lock (`Queue.acquire_maintenance_lock`) keeps two processes, ours or RQ's workers,
        from doing it at once; it is held for the milliseconds this takes (a process killed in them
        leaves it to lapse, after RQ's 15 minutes, while the other processes' recovery waits)."""
        if not self.queue.acquire_maintenance_lock():
            return 0
        try:
            StartedJobRegistry(self.queue.name, connection=self.redis, serializer=JSONSerializer).cleanup()
            return self.requeue_failed_heads()
        finally:
            self.queue.release_maintenance_lock()  # type: ignore[no-untyped-call]

    def requeue_failed_heads(self) -> int:
        """Failed jobs that are not dead letters: an attempt that never reported back (its worker died,
        or it raised before recording its outcome) is queued again while its update is its order's
        head; one whose update was delivered meanwhile is removed. Returns how many were queued."""
        ids = self.failed.get_job_ids(cleanup=False)  # a read: expired entries are RQ's workers' to clean
        if not ids:
            return 0
        with self.redis.pipeline(transaction=False) as pipe:
            for job_id in ids:
                read_dead_lettered(pipe, self.keys, job_id)
                read_pending(pipe, self.keys, job_id)
            answers = pipe.execute()
        requeued = 0
        for n, job_id in enumerate(ids):
            dead_lettered, pending = answers[2 * n], answers[2 * n + 1]
            if dead_lettered:
                continue
            try:
                job = Job.fetch(job_id, connection=self.redis, serializer=JSONSerializer)
                if not pending:  # delivered: RQ failed to record its success
                    forget_dead_executions(job)  # else RQ's delete fails on an execution already gone
                    self.failed.remove(job, delete_job=True)
                    continue
                update = job.args[0]
                if read_head(self.redis, self.keys, update["order_id"]) != job_id.encode():
                    continue
                forget_dead_executions(job)
                self.failed.requeue(job)
            except (NoSuchJobError, InvalidJobOperation, IndexError, KeyError, TypeError) as exc:
                # gone meanwhile, or not one of ours: said, since an attempt not queued again waits
                log.warning(
                    "failed job not queued again", update=job_id, reason=f"{type(exc).__name__}: {exc}"
                )
                continue
            requeued += 1
            log.warning("attempt of a dead or failed worker queued again", update=job_id)
        return requeued


def forget_dead_executions(job: Job) -> None:
    """Drop the executions of dead workers from the job's execution registry.

    RQ 3.0 keeps an execution's id in the job's registry 60 s longer than the execution's own hash; a
    job re-queued after its worker died and finished within that minute then fails in RQ's cleanup
    ("Execution ... not found in Redis").
    """
    registry = job.execution_registry
    connection = registry.connection
    for raw in connection.zrange(registry.key, 0, -1):
        execution_id = text(raw)
        if not connection.exists(Execution(id=execution_id, job_id=job.id, connection=connection).key):
            connection.zrem(registry.key, execution_id)

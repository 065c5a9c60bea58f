"""RQ's records of the jobs a DeliveryWorker keeps in flight, written a batch at a time.

RQ's worker takes, starts and ends one job at a time, each step a round trip of its own or more: its
success reads the job's status and its executions back (Job.delete) before deleting what it just read.
A worker with many deliveries in flight takes several jobs in one round trip (`JobTaker`: what RQ's
non-blocking dequeue does, LMOVE from the queue to RQ's intermediate queue, and its Job.fetch, for each,
as long as the queue has jobs), starts them in one transaction (`start_executions`: RQ's own steps, each on
that transaction: `Execution.create`, the job's heartbeat and `prepare_for_execution`, the intermediate
queue's LREM, the worker busy and its heartbeat), and ends the successful ones in one transaction
(`end_successes`).

Two of these steps have no public RQ method that takes them for a batch: the take, and the deletion of a
successful job RQ keeps no result of (`result_ttl` 0, every job the intake writes: receiver/rqstore.py).
Both are written here, every key named by RQ's own objects (Queue.key, IntermediateQueue.key, Job.key,
Job.dependents_key, Job.dependencies_key, Result.get_key, Job.execution_registry, Execution), and
tests/test_rq_contract.py holds what they leave, while a job runs and after it succeeded, against what
RQ's own SimpleWorker leaves for the same job. A job these steps do not cover (one whose result RQ keeps,
one with a success callback, a repeat or a rate limit: the intake writes none) ends through RQ's own
`handle_job_success`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from redis import Redis
from redis.client import Pipeline
from rq.executions import Execution
from rq.intermediate_queue import IntermediateQueue
from rq.job import Job
from rq.queue import Queue
from rq.results import Result
from rq.utils import as_text, now
from rq.worker import WorkerStatus

if TYPE_CHECKING:
    from rq.worker import BaseWorker


# KEYS[1]: the queue, KEYS[2]: RQ's intermediate queue. ARGV[1]: how many jobs at most, ARGV[2]: the
# prefix of RQ's job keys. RQ's non-blocking dequeue (LMOVE, head of the queue to the intermediate queue)
# until the queue is empty or ARGV[1] were taken, each job's hash read with it (RQ's Job.fetch).
TAKE = """
local taken = {}
for _ = 1, tonumber(ARGV[1]) do
  local id = redis.call('LMOVE', KEYS[1], KEYS[2], 'LEFT', 'RIGHT')
  if not id then break end
  taken[#taken + 1] = id
  taken[#taken + 1] = redis.call('HGETALL', ARGV[2] .. id)
end
return taken
"""


class JobTaker:
    """Takes jobs off one queue a batch at a time, for a worker with several deliveries in flight."""

    def __init__(self, connection: Redis, queue: Queue, job_class: type[Job]) -> None:
        self.connection = connection
        self.queue = queue
        self.job_class = job_class
        self.keys = [queue.key, IntermediateQueue(queue.key, connection).key]
        self.job_prefix = job_class.key_for("")
        self._take = connection.register_script(TAKE)

    def take(self, count: int) -> tuple[list[Job], list[str]]:
        """Up to `count` jobs off the head of the queue, in its order, moved to RQ's intermediate queue
        and read, in one round trip; and the ids taken whose job is gone (deleted after it was queued:
        RQ's dequeue passes over them, and so does the worker)."""
        answer = self._take(keys=self.keys, args=[count, self.job_prefix])
        jobs, gone = [], []
        for raw_id, flat in zip(answer[::2], answer[1::2], strict=True):
            job_id = as_text(raw_id)
            if not flat:
                gone.append(job_id)
                continue
            job = self.job_class(job_id, connection=self.connection, serializer=self.queue.serializer)
            job.restore(dict(zip(flat[::2], flat[1::2], strict=True)))  # as RQ's Job.fetch_many does
            jobs.append(job)
        return jobs, gone


def start_executions(
    worker: BaseWorker, queue: Queue, jobs: Sequence[Job], gone: Sequence[str], pipe: Pipeline
) -> list[Execution]:
    """Queue on transaction `pipe` RQ's start of each job's execution by `worker`: what RQ's
    `prepare_execution` and `prepare_job_execution` write for one job (its Execution, in the job's
    execution registry, RQ's StartedJobRegistry and the worker's executions; the job's heartbeat,
    status, start and worker; the job out of the intermediate queue), for all of them, then the worker
    busy with its heartbeat. `gone`: ids taken whose job no longer exists, dropped from the intermediate
    queue. Returns the executions, in the jobs' order: the caller registers them among the worker's
    executions (`register_executions`) once the transaction ran."""
    intermediate = IntermediateQueue(queue.key, worker.connection).key
    executions = []
    ttl = 0
    for job in jobs:
        ttl = worker.get_heartbeat_ttl(job)
        execution = Execution.create(job, ttl, pipeline=pipe, worker_name=worker.name)
        job.heartbeat(now(), ttl, pipeline=pipe)
        job.prepare_for_execution(worker.name, pipeline=pipe)
        pipe.persist(job.key)
        pipe.lrem(intermediate, 1, job.id)
        executions.append(execution)
    for job_id in gone:
        pipe.lrem(intermediate, 1, job_id)
    if jobs:
        worker.set_state(WorkerStatus.BUSY, pipeline=pipe)
        worker.heartbeat(ttl, pipeline=pipe)  # type: ignore[no-untyped-call]
    return executions


def register_executions(worker: BaseWorker, executions: Sequence[Execution]) -> None:
    """The executions `start_executions` wrote, now among the worker's own (RQ's `worker.executions`,
    as its `prepare_execution` keeps them), after their transaction ran: one that failed leaves none."""
    for execution in executions:
        worker.executions[execution.id] = execution


def ends_here(job: Job, worker: BaseWorker) -> bool:
    """Whether `end_successes` ends `job` as RQ's `handle_job_success` would: RQ keeps no result of it
    and nothing follows its success (no callback, repeat or rate limit)."""
    return (
        job.get_result_ttl(worker.default_result_ttl) == 0
        and job.success_callback is None
        and job.repeats_left is None
        and not job.has_rate_limit
        and not job.group_id
    )


def end_successes(worker: BaseWorker, ended: Sequence[tuple[Job, Execution]], pipe: Pipeline) -> None:
    """Queue on transaction `pipe` RQ's end of each successful execution in `ended` (jobs `ends_here`
    covers): the worker's counts of successful jobs and working time, the execution cleaned up (RQ's
    `cleanup_execution`: out of the StartedJobRegistry and the worker's executions), and the job
    deleted as RQ's `Job.delete` deletes a started job whose one execution this was (its hash, its
    dependents and dependencies, its results, its execution registry)."""
    for job, execution in ended:
        job.ended_at = job.ended_at or now()
        worker.increment_successful_job_count(pipeline=pipe)
        if job.started_at is not None:
            worker.increment_total_working_time(job.ended_at - job.started_at, pipe)
        pipe.delete(
            job.key,
            job.dependents_key,
            job.dependencies_key,
            Result.get_key(job.id),  # type: ignore[no-untyped-call]
            job.execution_registry.key,
        )
        worker.cleanup_execution(job, pipeline=pipe, execution=execution)

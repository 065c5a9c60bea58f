"""RQ's records of the jobs a DeliveryWorker keeps in flight, written a batch at a time.

RQ's worker takes, starts and ends one job at a time, each step a round trip of its own or more: its
success reads the job's status and its executions back (Job.delete) before deleting what it just read.
A worker with many deliveries in flight takes several jobs in one round trip (`take_job_ids`, what
RQ's non-blocking dequeue does, LMOVE from the queue to RQ's intermediate queue, for each), reads them
with RQ's `Job.fetch_many`, starts them in one transaction (`start_executions`: RQ's own steps, each on
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


def take_job_ids(connection: Redis, queue: Queue, count: int) -> list[str]:
    """Move up to `count` jobs' ids from the head of `queue` to RQ's intermediate queue, in the queue's
    order, in one round trip (RQ's non-blocking dequeue, LMOVE, `count` times); the ids moved."""
    intermediate = IntermediateQueue(queue.key, connection).key
    with connection.pipeline(transaction=False) as pipe:
        for _ in range(count):
            pipe.lmove(queue.key, intermediate)
        moved = pipe.execute()
    return [as_text(job_id) for job_id in moved if job_id is not None]


def fetch_jobs(
    connection: Redis, queue: Queue, job_ids: Sequence[str], job_class: type[Job]
) -> tuple[list[Job], list[str]]:
    """The jobs of `job_ids` (RQ's `Job.fetch_many`, one round trip), and the ids whose job is gone
    (deleted after it was queued: RQ's dequeue passes over them, and so does the worker)."""
    fetched = job_class.fetch_many(job_ids, connection=connection, serializer=queue.serializer)
    jobs = [job for job in fetched if job is not None]
    gone = [job_id for job_id, job in zip(job_ids, fetched, strict=True) if job is None]
    return jobs, gone


def start_executions(
    worker: BaseWorker, queue: Queue, jobs: Sequence[Job], gone: Sequence[str], pipe: Pipeline
) -> list[Execution]:
    """Queue on transaction `pipe` RQ's start of each job's execution by `worker`: what RQ's
    `prepare_execution` and `prepare_job_execution` write for one job (its Execution, in the job's
    execution registry, RQ's StartedJobRegistry and the worker's executions; the job's heartbeat,
    status, start and worker; the job out of the intermediate queue), for all of them, then the worker
    busy with its heartbeat. `gone`: ids taken whose job no longer exists, dropped from the intermediate
    queue. Returns the executions, in the jobs' order."""
    intermediate = IntermediateQueue(queue.key, worker.connection).key
    executions = []
    ttl = 0
    for job in jobs:
        ttl = worker.get_heartbeat_ttl(job)
        execution = Execution.create(job, ttl, pipeline=pipe, worker_name=worker.name)
        worker.executions[execution.id] = execution
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

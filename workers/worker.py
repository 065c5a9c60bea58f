"""DeliveryWorker: RQ's in-process worker, keeping up to DELIVERY_CONCURRENCY deliveries in flight.

What it sets through what RQ offers: the job's death penalty and heartbeat, both derived from
DELIVERY_TIMEOUT_SECONDS (so a dead worker's attempt counts as abandoned soon, not after RQ's 300 s job
timeout); how long one wait for a job lasts; and, for the runner, whether the loop ended on purpose.

Worker class: `SimpleWorker` (jobs run in the worker process; no fork per job). A delivery is a short
I/O-bound call that needs no isolation from the worker, and a long-lived process keeps its HTTP
connections to the merchant alive between deliveries. What forking would protect against (a job that
crashes or leaks) is covered by crash recovery (workers/maintenance.py).

Several in flight: RQ's loop asks for a job (`dequeue_job_and_maintain_ttl`) and runs it (`execute_job`).
Here the first takes, once threads are free and the destination has slots, a batch of jobs and starts
them in one transaction (workers/rqrecords.py: RQ's own steps, and the two RQ has no batch step for),
handing RQ's loop one started job at a time; the second gives each to a thread of a pool, which runs
it under RQ's death penalty and records its end: RQ's own handlers for a `Retry` or a failure, and for a
success one transaction with the others that ended meanwhile. With DELIVERY_CONCURRENCY=1 it is RQ's own
`execute_job` on the main thread.

Disk flushes: with `appendfsync always` (deploy/redis.conf) Redis flushes the append-only file before it
answers any round trip that wrote, so a worker's rate is bounded by its writing round trips per job as
much as by its CPU: a batch shares them. RQ's loop refreshes the worker's heartbeat four times per job,
sets its state to idle twice and looks for `rq suspend` once, each a round trip of its own;
DeliveryWorker sends a heartbeat as one pipeline and refreshes it at most once a second, looks for a
suspension at most once a second, writes a state only when it changes, and sets itself idle in the
transaction that ends the last execution in flight. Its jobs (DeliveryJob) count the delivery attempt
in the transaction that starts them, which also reads where the attempt starts. docs/performance.md
measures what each gives; docs/operations.md says which of RQ's records are written by our code, and why.
"""

from __future__ import annotations

import math
import sys
import threading
import time
import traceback
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from queue import Empty, SimpleQueue
from types import FrameType
from typing import Any

from redis import Redis
from redis.client import Pipeline
from rq import Queue, SimpleWorker
from rq.exceptions import StopRequested
from rq.executions import Execution
from rq.job import Job, Retry
from rq.serializers import JSONSerializer
from rq.timeouts import BaseDeathPenalty, JobTimeoutException, TimerDeathPenalty, UnixSignalDeathPenalty
from rq.utils import now
from rq.worker import WorkerStatus

from receiver.inflight import InFlightLeases
from receiver.logs import log
from receiver.rqstore import DELIVER_UPDATE
from receiver.settings import Settings
from workers import rqrecords
from workers.delivery import (
    AttemptStart,
    attempt_start,
    count_attempt_commands,
    current_context,
    start_attempt_commands,
)
from workers.gate import PROBE, DeliveryGate

# How long one BLMOVE waits for a job: under the workers' socket timeout (10 s, DeliveryContext), or each
# idle wait would end in a TimeoutError that RQ answers with a growing pause (up to a minute).
DEQUEUE_WAIT_SECONDS = 5
# How long a worker with a gate waits for a job before it passes the gate again (workers/gate.py).
GATE_RECHECK_SECONDS = 1
# How often RQ's periodic heartbeat (no timeout given) is sent while jobs follow one another.
HEARTBEAT_REFRESH_SECONDS = 1.0
# The most jobs taken and started in one batch, and the most successes ended in one transaction.
MAX_BATCH = 32
MAX_ENDED_BATCH = 64


def attempt_timeout_seconds(config: Settings | float) -> int:
    """How long one attempt may run: a POST's connect + read timeouts (DELIVERY_TIMEOUT_SECONDS, or a
    destination's own) plus a handler's share, and slack."""
    timeout = config.delivery_timeout_seconds if isinstance(config, Settings) else config
    return math.ceil(2 * timeout) + 2


def attempt_death_penalty(seconds: int, threaded: bool = False) -> type[BaseDeathPenalty]:
    """RQ's death penalty (its `death_penalty_class`), never longer than one attempt may run: SIGALRM's
    for a job run by the process's main thread, RQ's timer-thread one for jobs run on a pool's threads
    (a signal reaches the main thread only)."""
    base: type[BaseDeathPenalty] = TimerDeathPenalty if threaded else UnixSignalDeathPenalty

    class AttemptDeathPenalty(base):  # type: ignore[valid-type,misc]
        def __init__(self, timeout: Any, exception: Any = None, **kwargs: Any) -> None:
            bounded = seconds if timeout is None or timeout < 0 else min(timeout, seconds)
            super().__init__(bounded, exception or JobTimeoutException, **kwargs)

    return AttemptDeathPenalty


class DeliveryJob(Job):
    """RQ's Job, whose preparation for execution (RQ's `prepare_for_execution`, on the transaction in which
    the job is started) also counts the delivery attempt; DeliveryWorker reads where the attempt starts
    in that transaction too (`attempt`), so that the attempt itself need not. A plain `rq worker` runs
    RQ's Job, and the attempt counts and reads for itself there."""

    attempt_counted = False
    probe = False  # the one delivery its down destination lets out (workers/gate.py)
    lease: str | None = None  # its place among the destination's requests in flight (receiver/inflight.py)
    execution: Execution | None = None  # started in a batch (DeliveryWorker.take_batch)
    attempt: AttemptStart | None = None  # where its attempt starts, read as it was started

    def prepare_for_execution(self, worker_name: str, pipeline: Pipeline) -> None:
        super().prepare_for_execution(worker_name, pipeline)
        count_attempt_commands(pipeline, current_context().keys, self.id)
        self.attempt_counted = True


class DeliveryWorker(SimpleWorker):
    """SimpleWorker whose job heartbeat lasts one attempt (its death penalty's bound) and a little, and
    which keeps up to `concurrency` deliveries in flight, each on a thread of a pool.

    The main thread takes a batch of jobs once threads are free and starts them in one transaction
    (`take_batch`, `start_jobs`: workers/rqrecords.py), then hands them one by one to RQ's loop, whose
    `execute_job` gives each to a pool thread (`perform_in_lane`: the job under RQ's death penalty, then
    its end). A job is taken only when a thread is free and, with `leases`, when the destination has a
    slot (receiver/inflight.py): one waiting is still on the queue; with a `gate`, only while the
    destination is up (workers/gate.py). With `concurrency` 1 it is RQ's own `execute_job`.
    """

    job_class = DeliveryJob
    attempt_timeout = 300
    concurrency = 1
    leases: InFlightLeases | None = None
    gate: DeliveryGate | None = None
    stop_requested = False  # SIGTERM or SIGINT: RQ's loop ends on purpose
    drained = False  # burst mode found the queue empty
    waiting_for_job = False  # the main thread waits for a thread, a slot or a job: a stop ends the wait

    refreshed_at = -math.inf  # time.monotonic() of the last periodic heartbeat sent
    suspension_checked_at = -math.inf  # and of the last look for `rq suspend`
    lanes: threading.Condition
    busy_lanes = 0  # deliveries in flight, and the one being taken
    taken_probe = False  # the job being taken is its down destination's probe (workers/gate.py)
    pool: ThreadPoolExecutor | None = None
    taken: deque[tuple[Job, Queue]]  # jobs of the last batch, started, not yet handed to a thread
    ended: SimpleQueue[tuple[Job, Execution, str | None]]  # successes whose end is not yet recorded
    ending: threading.Lock  # held by the thread recording them
    taker: rqrecords.JobTaker | None = None

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

    def check_for_suspension(self, burst: bool) -> None:
        """RQ's look for `rq suspend` (it holds the worker until `rq resume`; a burst worker stops), at
        most once a HEARTBEAT_REFRESH_SECONDS: RQ's loop looks before every job it takes, a round trip
        of its own each, where a batch hands it several jobs in a row."""
        if time.monotonic() - self.suspension_checked_at < HEARTBEAT_REFRESH_SECONDS:
            return
        super().check_for_suspension(burst)
        self.suspension_checked_at = time.monotonic()

    def set_state(self, state: str, pipeline: Pipeline | None = None) -> None:
        """RQ's set_state, except that a state the worker is already in is not written again (RQ sets
        idle after each job and again before each wait for the next), and that it stays busy while any
        delivery is in flight."""
        if state == WorkerStatus.IDLE and self.executions:
            state = WorkerStatus.BUSY
        if pipeline is None and state == self.get_state():
            return
        super().set_state(state, pipeline=pipeline)  # type: ignore[no-untyped-call]

    def cleanup_execution(self, job: Job, pipeline: Pipeline, execution: Execution | None = None) -> None:
        """RQ's end of an execution, and the worker idle again in the same transaction when it was the
        last in flight: the mirror of RQ's start of one, which sets it busy in its own
        (rq.executions.prepare_execution)."""
        super().cleanup_execution(job, pipeline=pipeline, execution=execution)  # type: ignore[no-untyped-call]
        if not self.executions:
            self.set_state(WorkerStatus.IDLE, pipeline=pipeline)
        # With deliveries on pool threads the main thread may be waiting for a job meanwhile: the
        # heartbeat RQ's loop sends after each job rides here (at most once a second), no round trip.
        self.heartbeat(pipeline=pipeline)

    def request_stop(self, signum: int, frame: FrameType | None) -> None:
        """RQ's warm stop: no job is taken any more; the deliveries in flight end (teardown waits)."""
        self.stop_requested = True
        super().request_stop(signum, frame)  # type: ignore[no-untyped-call]
        if self.waiting_for_job:  # busy with deliveries in flight, but only waiting itself: stop waiting
            raise StopRequested()

    def dequeue_job_and_maintain_ttl(
        self, timeout: int | None, max_idle_time: int | None = None
    ) -> tuple[Job, Queue] | None:
        """The next job, started: one of the last batch taken, else a new batch (`take_batch`) once a
        thread is free and the destination has a slot, else RQ's wait for a job. In burst mode an
        empty queue ends the loop only once no delivery is in flight (a delivery's end may queue its
        order's next update)."""
        if self.taken:
            return self.taken.popleft()
        # With a gate, one wait lasts GATE_RECHECK_SECONDS (RQ's own idle bound), then the gate is passed
        # again: a pause holds the next job within about that long, not after the next job came.
        rechecks = self.gate is not None and timeout is not None and max_idle_time is None
        while True:
            self.check_for_suspension(burst=timeout is None)  # RQ's loop looks only between jobs
            self.waiting_for_job = True
            try:
                leases = self.take_lanes()
                try:
                    if self.pool is not None:
                        started = self.take_batch(leases)
                        if started:
                            self.taken.extend(started[1:])
                            return started[0]
                        leases = leases[:1]  # take_batch ended the others' lanes
                    result = super().dequeue_job_and_maintain_ttl(
                        timeout, GATE_RECHECK_SECONDS if rechecks else max_idle_time
                    )
                except BaseException:
                    self.end_lanes(leases)
                    raise
            finally:
                self.waiting_for_job = False
            if result is not None:
                job = result[0]
                job.lease, job.probe = leases[0], self.taken_probe  # type: ignore[attr-defined]
                self.taken_probe = False
                return result
            self.end_lanes(leases)
            if self.taken_probe and self.gate is not None:  # the probe found no job
                self.taken_probe = False
                self.gate.probe_unused()
            if self.leases is not None:  # the queue was empty: leases beyond the next wait's go back
                self.leases.return_spare(keep=1 if rechecks else 0)
            if rechecks:
                continue
            if timeout is None and self.wait_for_deliveries():
                continue  # burst: deliveries ended meanwhile; look again
            self.drained = True
            return None

    def take_lanes(self) -> list[str | None]:
        """Wait until fewer than `concurrency` deliveries are in flight (heartbeats going on) and reserve
        the free places (up to MAX_BATCH), then pass the destination's gate (its probe takes one place),
        then take a lease on one of its slots for each place (waiting for the first; the places no slot
        is free for are given back). Returns the places' leases (None each without `leases`)."""
        with self.lanes:
            while self.busy_lanes >= self.concurrency:
                self.lanes.wait(HEARTBEAT_REFRESH_SECONDS)
                self.heartbeat()
            places = min(self.concurrency - self.busy_lanes, MAX_BATCH) if self.pool is not None else 1
            self.busy_lanes += places
        if self.gate is not None:
            passed = self.gate.pass_through(lambda: self.stop_requested, self.heartbeat)
            if passed is None:
                self.end_lanes([None] * places)
                raise StopRequested()
            self.taken_probe = passed == PROBE
            if self.taken_probe and places > 1:  # the probe goes alone
                self.end_lanes([None] * (places - 1))
                places = 1
        if self.leases is None:
            return [None] * places
        try:
            first = self.leases.take(give_up=lambda: self.stop_requested)
        except BaseException:
            self.end_lanes([None] * places)
            raise
        if first is None:
            self.end_lanes([None] * places)
            raise StopRequested()
        try:
            more: list[str | None] = list(self.leases.take_more(places - 1)) if places > 1 else []
        except BaseException:
            self.end_lanes([first] + [None] * (places - 1))
            raise
        if 1 + len(more) < places:
            self.end_lanes([None] * (places - 1 - len(more)))
        return [first, *more]

    def take_batch(self, leases: list[str | None]) -> list[tuple[Job, Queue]]:
        """Take up to one job per lease off the queue and start them all (workers/rqrecords.py: two
        round trips for the batch); the places no job was found for are given back but the first."""
        queue = self.queues[0]
        if self.taker is None:
            self.taker = rqrecords.JobTaker(self.connection, queue, self.job_class)
        jobs: list[Job] = []
        while not jobs:
            jobs, gone = self.taker.take(len(leases))
            if not jobs and not gone:
                self.end_lanes(leases[1:])
                return []
            if gone and not jobs:  # only jobs deleted after they were queued: drop them and look again
                self.start_jobs(queue, [], gone)
        self.start_jobs(queue, jobs, gone)
        self.end_lanes(leases[len(jobs) :])
        for job, lease in zip(jobs, leases, strict=False):
            job.lease, job.probe = lease, self.taken_probe  # type: ignore[attr-defined]
        self.taken_probe = False
        return [(job, queue) for job in jobs]

    def start_jobs(self, queue: Queue, jobs: list[Job], gone: list[str]) -> None:
        """Start `jobs` in one transaction (workers/rqrecords.py; `gone`: ids taken whose job no longer
        exists), reading in it, after the attempt's count, where each delivery's attempt starts (the
        update still its order's head, its delivery record: workers.delivery.start_attempt_commands),
        so that the attempt itself need not read it again."""
        keys = current_context().keys
        with self.connection.pipeline() as pipe:
            executions = rqrecords.start_executions(self, queue, jobs, gone, pipe)
            reads = []  # (job, how many answers the transaction has up to its reads)
            for job in jobs:
                if job.func_name == DELIVER_UPDATE and job.args:
                    start_attempt_commands(pipe, keys, job.args[0], counted=True)
                    reads.append((job, len(pipe)))
            answers = pipe.execute()
        rqrecords.register_executions(self, executions)
        for job, execution in zip(jobs, executions, strict=True):
            job.execution = execution  # type: ignore[attr-defined]
        for job, end in reads:
            update = job.args[0]
            job.attempt = attempt_start(update, answers[:end], keys.job_id(update["id"]))  # type: ignore[attr-defined]

    def end_lanes(self, leases: list[str | None]) -> None:
        """The places of `leases` are free again (their deliveries ended, or they took no job)."""
        if not leases:
            return
        if self.leases is not None:
            for lease in leases:
                self.leases.give_back(lease)
        with self.lanes:
            self.busy_lanes -= len(leases)
            self.lanes.notify_all()

    def wait_for_deliveries(self) -> bool:
        """Wait until no delivery is in flight; whether there were any."""
        with self.lanes:
            if not self.busy_lanes:
                return False
            while self.busy_lanes:
                self.lanes.wait(HEARTBEAT_REFRESH_SECONDS)
        return True

    def execute_job(self, job: Job, queue: Queue) -> None:
        """Run the job (RQ's `execute_job`: its start, `perform_job` and end) on this thread when one
        delivery at a time is asked for; else on a pool thread, started already when it came in a
        batch (`take_batch`), started here (`start_jobs`, a batch of one) when RQ's wait brought it."""
        lease: str | None = job.lease  # type: ignore[attr-defined]
        if self.pool is None:
            try:
                super().execute_job(job, queue)
            finally:
                self.end_lanes([lease])
            return
        try:
            if getattr(job, "execution", None) is None:
                self.start_jobs(queue, [job], [])
            self.pool.submit(self.perform_in_lane, job, queue, job.execution, lease)  # type: ignore[attr-defined]
        except BaseException:
            self.end_lanes([lease])
            raise

    def perform_in_lane(self, job: Job, queue: Queue, execution: Execution, lease: str | None) -> None:
        """On a pool thread: run the job under RQ's death penalty, then record its end: a success with
        the others that ended meanwhile (`end_successes`), a `Retry` or a failure through RQ's own
        handlers (`handle_job_retry`, `handle_exception` and `handle_job_failure`)."""
        handed_on = False  # to end_ended, which frees the place
        try:
            job.started_at = now()
            try:
                timeout = job.timeout or queue.DEFAULT_TIMEOUT
                with self.death_penalty_class(timeout, JobTimeoutException, job_id=job.id):
                    returned = job.perform()
            except Exception:
                exc_info = sys.exc_info()
                self.handle_execution_ended(job, queue, job.failure_callback_timeout)
                self.handle_exception(job, *exc_info)
                self.handle_job_failure(
                    job=job,
                    exc_string="".join(traceback.format_exception(*exc_info)),
                    queue=queue,
                    started_job_registry=queue.started_job_registry,
                    execution=execution,
                )
            else:
                if isinstance(returned, Retry):
                    self.handle_execution_ended(job, queue, job.success_callback_timeout)
                    self.handle_job_retry(job, queue, returned, queue.started_job_registry, execution)
                elif not rqrecords.ends_here(job, self):
                    self.handle_execution_ended(job, queue, job.success_callback_timeout)
                    self.handle_job_success(job, queue, queue.started_job_registry, execution)
                else:
                    job.ended_at = now()
                    self.ended.put((job, execution, lease))
                    handed_on = True
                    self.end_ended()
        except Exception:  # RQ records the job's own failures; this is RQ's bookkeeping failing (Redis)
            log.exception("delivery thread could not record a job's end", job=job.id)
        finally:
            if not handed_on:
                self.end_lanes([lease])

    def end_ended(self) -> None:
        """Record the end of the successful deliveries waiting for it, in one transaction, and free
        their places. One thread at a time does it, for every delivery that ended meanwhile; a thread
        that finds another doing it leaves its own to that one (which looks again before it stops)."""
        while self.ended.qsize():
            if not self.ending.acquire(blocking=False):
                return
            try:
                batch: list[tuple[Job, Execution, str | None]] = []
                while len(batch) < MAX_ENDED_BATCH:
                    try:
                        batch.append(self.ended.get_nowait())
                    except Empty:
                        break
                if batch:
                    try:
                        with self.connection.pipeline() as pipe:
                            rqrecords.end_successes(
                                self, [(job, execution) for job, execution, _ in batch], pipe
                            )
                            pipe.execute()
                    except Exception:
                        ids = [job.id for job, _, _ in batch]
                        log.exception("delivery thread could not record jobs' end", jobs=ids)
                    finally:
                        self.end_lanes([lease for _, _, lease in batch])
            finally:
                self.ending.release()

    def teardown(self) -> None:
        """Let the deliveries in flight end (each bounded by its death penalty), return the leases (kept
        for the next loop when Redis is out of reach), then RQ's teardown."""
        if self.pool is not None:
            while self.taken:  # started in the last batch: in flight for RQ, so they run too
                self.execute_job(*self.taken.popleft())
            self.pool.shutdown(wait=True)
        if self.leases is not None:
            self.leases.end_loop()
        super().teardown()  # type: ignore[no-untyped-call]

    @property
    def dequeue_timeout(self) -> int:
        return DEQUEUE_WAIT_SECONDS

    def unsubscribe(self) -> None:
        """RQ's unsubscribe from the worker's command channel, its listening thread told to stop first.
        redis-py's `stop()` now waits for that thread to end, and RQ told it only after unsubscribing:
        a thread that had read the unsubscribe's reply meanwhile waited for a new subscription for RQ's
        `sleep_time` (60 s) before it looked at its flag again, so a worker's exit (a burst run's end, a
        SIGTERM) could take a minute."""
        if self.pubsub_thread is not None:
            self.pubsub_thread.stop(timeout=0)  # the flag only; RQ's unsubscribe waits for the thread
        super().unsubscribe()  # type: ignore[no-untyped-call]

    def stop_listening(self) -> None:
        """Stop the command-channel thread RQ's teardown did not reach (it would run on for good)."""
        if self.pubsub_thread is not None:
            self.pubsub_thread.stop(timeout=1)

    @property
    def ended_on_purpose(self) -> bool:
        return self.stop_requested or self.drained


def delivery_worker(
    queue: Queue,
    connection: Redis,
    attempt_seconds: int,
    concurrency: int = 1,
    leases: InFlightLeases | None = None,
    gate: DeliveryGate | None = None,
) -> DeliveryWorker:
    """A DeliveryWorker on `queue` (RQ's JSON serializer), its job heartbeat and death penalty bounded by
    one attempt of `attempt_seconds` (attempt_timeout_seconds), keeping up to `concurrency` deliveries
    in flight, within the destination's bound when `leases` are given, while its `gate` lets them."""
    worker = DeliveryWorker([queue], connection=connection, serializer=JSONSerializer, worker_ttl=60)
    worker.attempt_timeout = attempt_seconds
    worker.concurrency = concurrency
    worker.lanes = threading.Condition()
    worker.taken = deque()
    worker.ended = SimpleQueue()
    worker.ending = threading.Lock()
    worker.leases = leases
    worker.gate = gate
    if concurrency > 1:
        worker.pool = ThreadPoolExecutor(concurrency, thread_name_prefix="delivery")
    worker.death_penalty_class = attempt_death_penalty(attempt_seconds, threaded=concurrency > 1)
    return worker

"""`intergiro-receiver worker`: RQ workers that deliver updates, one process each (workers/worker.py),
plus in every process a maintenance thread (workers/maintenance.py).
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import signal
import sys
import threading
from types import FrameType

from redis.exceptions import RedisError
from rq import Queue
from rq.serializers import JSONSerializer

from receiver.logs import configure_logging, log
from receiver.settings import Settings
from workers.delivery import DeliveryContext, TargetNotConfigured, build_targets, use_context
from workers.maintenance import Maintenance
from workers.worker import DeliveryWorker, attempt_death_penalty, attempt_timeout_seconds

MAX_RESTART_PAUSE_SECONDS = 10.0


def work(settings: Settings, burst: bool) -> int:
    """One worker process: deliver until stopped (or, with burst, until the queue is empty)."""
    configure_logging(settings.log_format, settings.log_level)
    try:
        context = DeliveryContext.create(settings)
    except TargetNotConfigured as exc:
        print(f"intergiro-receiver worker: {exc}", file=sys.stderr)
        return 1
    use_context(context)
    timeout = attempt_timeout_seconds(settings)
    maintenance = Maintenance(context, settings.queue_name, recovery_seconds=max(1.0, timeout / 2))
    queue = Queue(settings.queue_name, connection=context.redis, serializer=JSONSerializer)
    if burst:
        maintenance.chains.move_due()
        maintenance.recover_abandoned()
        maintenance.chains.release_stale_heads()
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
                worker.attempt_timeout = timeout
                worker.death_penalty_class = attempt_death_penalty(timeout)
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

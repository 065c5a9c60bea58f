"""`intergiro-receiver worker`: RQ workers that deliver updates, one process each (workers/worker.py),
plus in every process a maintenance thread (workers/maintenance.py).

Each process serves one destination (its own RQ queue), so a destination that is down or slow holds
only its own processes: `--processes N` starts N per destination served (every configured one, or
those named with `--destination`).
"""

from __future__ import annotations

import functools
import logging
import os
import time
from collections.abc import Callable

from redis.exceptions import RedisError
from rq import Queue
from rq.serializers import JSONSerializer

from receiver import __version__, tracing
from receiver.chains import OrderChains
from receiver.connections import sync_redis
from receiver.destinations import PROCESSES_PER_DESTINATION, Destination
from receiver.errors import CommandError, report
from receiver.history import DESTINATION_REMOVED_REASON
from receiver.inflight import InFlightLeases
from receiver.logs import configure_logging, log
from receiver.rediskeys import RedisKeys
from receiver.settings import Settings
from receiver.supervisor import stopped_within, supervise
from workers.delivery import DeliveryContext, TargetNotConfigured, build_targets, use_context
from workers.gate import DeliveryGate
from workers.maintenance import Maintenance
from workers.worker import DeliveryWorker, attempt_timeout_seconds, delivery_worker

MAX_RESTART_PAUSE_SECONDS = 10.0
# A loop that ran this long before a Redis error ended it met a new outage (restart_pause).
STEADY_LOOP_SECONDS = 60.0


def work(settings: Settings, burst: bool, destination: Destination | None = None) -> int:
    """One worker process of one destination (`merchant` when not given): deliver until stopped (or,
    with burst, until its queue is empty)."""
    configure_logging(settings.log_format, settings.log_level)
    try:
        context = DeliveryContext.create(settings, destination)
    except TargetNotConfigured as exc:
        report("worker", str(exc))
        return 1
    use_context(context)
    tracing.start(settings, "worker")
    queue_name = context.keys.queue_name
    timeout = attempt_timeout_seconds(context.destination.timeout_seconds)
    maintenance = Maintenance(context, queue_name, recovery_seconds=max(1.0, timeout / 2))
    queue = Queue(queue_name, connection=context.redis, serializer=JSONSerializer)
    if burst:
        maintenance.retries.move_due()
        maintenance.recover_abandoned()
        maintenance.chains.release_stale_heads()
    maintenance.start()
    rq_level = "DEBUG" if settings.log_level == "DEBUG" else "WARNING"
    log.info(
        "worker starting",
        queue=queue_name,
        destination=context.destination.name,
        pid=os.getpid(),
        burst=burst,
        concurrency=settings.delivery_concurrency,
        max_in_flight=context.destination.max_in_flight,
        version=__version__,
        settings=settings.summary(),
        tracing=tracing.status(settings),
    )
    pause: float | None = None
    # the process's leases, kept across the loop's restarts (receiver/inflight.py)
    leases = InFlightLeases(context.redis, context.keys.in_flight, context.destination.max_in_flight)
    try:
        while True:
            worker: DeliveryWorker | None = None
            started = time.monotonic()
            try:  # RQ reaches Redis already in the constructor, and again in its teardown
                gate = DeliveryGate(context.state, probe_lease_seconds=timeout)
                worker = delivery_worker(
                    queue, context.redis, timeout, settings.delivery_concurrency, leases, gate
                )
                worker.work(burst=burst, logging_level=rq_level, with_scheduler=False)
            except RedisError as exc:
                log.warning("worker cannot reach Redis", error=str(exc))
                if worker is not None:
                    worker.stop_listening()
            pause = restart_pause(pause, time.monotonic() - started)
            if (worker is not None and worker.ended_on_purpose) or not pause_before_restart(pause):
                break
    finally:
        leases.stop()
        maintenance.stopping.set()
        tracing.current().shutdown()  # the spans still waiting, sent
        log.info("worker stopped", queue=queue_name)
    return 0


def restart_pause(last: float | None, ran_seconds: float) -> float:
    """The pause before the loop starts again after a Redis error ended it, having run `ran_seconds`:
    a second the first time, doubling (up to MAX_RESTART_PAUSE_SECONDS) while it keeps failing, and a
    second again after a loop that ran steadily (a new outage, not the same one still going on)."""
    if last is None or ran_seconds > STEADY_LOOP_SECONDS:
        return 1.0
    return min(last * 2, MAX_RESTART_PAUSE_SECONDS)


def pause_before_restart(seconds: float) -> bool:
    """RQ's loop retries Redis only while it waits for a job: a Redis error anywhere else (a failover in
    the middle of a delivery, a heartbeat) ends it, and the process would exit with updates still queued.
    So the loop is started again, as a new RQ worker, after a pause; False when SIGTERM/SIGINT came."""
    log.warning("worker loop ended on a Redis error; starting it again", retry_in=seconds)
    return not stopped_within(seconds)


def served_destinations(settings: Settings, names: list[str] | None) -> list[Destination]:
    """The destinations named (every configured one when None); ValueError names one not configured."""
    if not names:
        return list(settings.destinations)
    served = []
    for name in dict.fromkeys(names):
        destination = settings.destination(name)
        if destination is None:
            configured = ", ".join(d.name for d in settings.destinations)
            raise ValueError(f"--destination {name}: not a configured destination ({configured})")
        served.append(destination)
    return served


def retire_removed_destinations(settings: Settings) -> dict[str, int]:
    """Dead-letter, with the reason `destination removed`, the pending deliveries of every destination
    the workers ran with before and the configuration no longer has; then remember the configured set.
    Returns how many were dead-lettered per removed destination."""
    redis = sync_redis(settings, timeout=10)
    try:
        keys = RedisKeys.of(settings)
        configured = [d.name for d in settings.destinations]
        known = {raw.decode() for raw in redis.smembers(keys.destinations)}  # type: ignore[union-attr]
        dropped = {}
        for name in sorted(known - set(configured)):
            own = keys.for_destination(name)
            dropped[name] = OrderChains(redis, own, settings.history_retention_seconds).drop_all(
                DESTINATION_REMOVED_REASON
            )
            redis.srem(keys.destinations, name)
            log.warning(
                "destination removed: its pending deliveries dead-lettered",
                destination=name,
                count=dropped[name],
            )
        redis.sadd(keys.destinations, *configured)
        return dropped
    finally:
        redis.close()


def run_workers(
    settings: Settings,
    burst: bool = False,
    processes: int = PROCESSES_PER_DESTINATION,
    destinations: list[str] | None = None,
    started: Callable[[int], object] | None = None,
) -> int:
    """Start `processes` worker processes per destination served (or work in this one when that makes
    one) and wait for them; 1 when any failed. `started` is called with the number of worker processes
    once the configuration is known to work, before any starts (the metrics endpoint)."""
    try:
        served = served_destinations(settings, destinations)
        for destination in served:
            build_targets(destination)  # refuse to start, with one line, before forking anything
    except (TargetNotConfigured, ValueError) as exc:
        raise CommandError(str(exc)) from None
    if processes < 1:
        raise CommandError("--processes must be 1 or more", exit_code=2)
    if started is not None:
        started(processes * len(served))
    if not destinations:  # a worker of some destinations only (another team's, maybe with older settings)
        try:  # never decides that the others were removed
            retire_removed_destinations(settings)
        except RedisError as exc:
            log.warning("could not check for removed destinations", error=str(exc))
    if processes == 1 and len(served) == 1:
        return work(settings, burst, served[0])
    logging.getLogger("rq").setLevel(logging.WARNING)
    children = [functools.partial(work, settings, burst, d) for d in served for _ in range(processes)]
    return supervise(children, "worker", together=False)

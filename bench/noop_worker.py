"""RQ's own rate, for bench/drain: `processes` forked `SimpleWorker`s (the class our DeliveryWorker
extends) in burst mode on a queue of no-op jobs, JSON serializer, RQ logging at WARNING as ours runs.

    python -m bench.noop_worker REDIS_URL QUEUE PROCESSES
"""

from __future__ import annotations

import multiprocessing
import sys

from redis import Redis
from rq import Queue, SimpleWorker
from rq.serializers import JSONSerializer


def noop() -> None:
    """The job: nothing at all."""


def work(url: str, queue_name: str) -> None:
    connection = Redis.from_url(url)
    queue = Queue(queue_name, connection=connection, serializer=JSONSerializer)
    worker = SimpleWorker([queue], connection=connection, serializer=JSONSerializer, worker_ttl=60)
    worker.work(burst=True, logging_level="WARNING", with_scheduler=False)


def main(url: str, queue_name: str, processes: int) -> int:
    fork = multiprocessing.get_context("fork")
    children = [fork.Process(target=work, args=(url, queue_name)) for _ in range(processes)]
    for child in children:
        child.start()
    for child in children:
        child.join()
    return 1 if any(child.exitcode for child in children) else 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1], sys.argv[2], int(sys.argv[3])))

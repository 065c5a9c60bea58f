"""What a delivery costs Redis' disk, and what RQ's tools still see of the worker.

With `appendfsync always` (deploy/redis.conf) Redis flushes its append-only file before it answers a
round trip that wrote, so the worker's writing round trips per delivery bound how many updates a process
delivers per second (docs/performance.md). They are counted here on RQ's own loop (DeliveryWorker, in
this process, on a connection that notes every round trip it sends) against a real Redis; and on a real
worker process, RQ's Worker API still shows the truth: busy with the update while it is delivered, idle
after, and a heartbeat that keeps its key alive.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import pytest
import redis
from rq import Queue, Worker
from rq.serializers import JSONSerializer

import workers.delivery
from bench.round_trips import NotingConnection, deliver_all, is_writing, noting_client, write_commands
from receiver.settings import Settings
from tests.merchant_handlers import DELIVERED
from tests.sink import Sink, wait_for
from tests.test_workers import EVENTS, post_order, webhook_settings

# Writing round trips of one delivery, as RQ and the product make them today: RQ's dequeue (LMOVE), its
# two preparation transactions (the attempt counted in the second), the job's end heartbeat and its
# success transaction (the worker's idle state in it); the attempt's finish (one script run). RQ's own
# loop, with the attempt counted in a transaction of its own, made 19.
WRITES_PER_DELIVERY = 6


@pytest.fixture
def noting_redis(redis_url: str) -> Iterator[redis.Redis]:
    client = noting_client(redis_url)
    NotingConnection.sent = []
    yield client
    client.close()


async def test_a_delivery_writes_to_redis_in_at_most_six_round_trips(
    receiver: Any,
    rsa_key: Any,
    settings: Settings,
    noting_redis: redis.Redis,
    sync_redis: redis.Redis,
    redis_url: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    orders = 10
    for n in range(orders):
        await post_order(receiver, rsa_key, f"FlushOrder{n:06d}", EVENTS)
    deliveries = orders * len(EVENTS)
    writes = write_commands(sync_redis)
    monkeypatch.setenv("REDIS_URL", redis_url)
    monkeypatch.setattr(workers.delivery, "_context", None)
    started = time.monotonic()
    deliver_all(settings.with_changes(merchant_handler="tests.merchant_handlers:takes"), noting_redis)

    assert sync_redis.llen(DELIVERED) == deliveries
    writing = sum(1 for names in NotingConnection.sent if is_writing(names, writes))
    seconds = time.monotonic() - started
    print(f"{writing} writing round trips of {len(NotingConnection.sent)} for {deliveries} deliveries")
    # and the worker's start and end (registration, its death) and a heartbeat a second while it runs
    allowed = WRITES_PER_DELIVERY * deliveries + 20 + math.ceil(seconds)
    assert writing <= allowed, f"{writing / deliveries:.1f} writing round trips per delivery"


def heartbeat_of(client: redis.Redis, queue: Queue) -> tuple[Worker, datetime]:
    [worker] = Worker.all(connection=client, queue=queue, serializer=JSONSerializer)
    assert worker.last_heartbeat is not None
    return worker, worker.last_heartbeat.replace(tzinfo=UTC)


async def test_rqs_worker_api_shows_the_worker_busy_with_the_update_then_idle_with_a_fresh_heartbeat(
    receiver: Any, rsa_key: Any, sink: Sink, workers: Any, sync_redis: redis.Redis, queue: Queue
) -> None:
    sink.answer = lambda _id, _n: (200, {}, 2.5)  # each delivery takes 2.5 s
    [update_id] = await post_order(receiver, rsa_key, "SlowOrder0000001")
    workers(**webhook_settings(sink))
    await wait_for(lambda: len(sink.received) == 1, what="the delivery to start")

    worker, _ = heartbeat_of(sync_redis, queue)
    assert worker.get_state() == "busy"
    assert worker.get_current_job_id() == update_id
    started = datetime.now(UTC)
    await wait_for(lambda: heartbeat_of(sync_redis, queue)[0].get_state() == "idle", what="idle")
    worker, beat = heartbeat_of(sync_redis, queue)
    assert worker.get_current_job_id() is None
    assert beat >= started, "the heartbeat after a job longer than a second was not sent"
    assert sync_redis.ttl(worker.key) > 60  # refreshed to RQ's worker_ttl + 60, not left to run out

"""What a delivery costs Redis' disk, and what RQ's tools still see of the worker.

With `appendfsync always` (deploy/redis.conf) Redis flushes its append-only file before it answers a
round trip that wrote, so the worker's writing round trips per delivery bound how many updates a process
delivers per second (docs/performance.md). They are counted here on RQ's own loop (DeliveryWorker, in
this process, on a connection that notes every round trip it sends) against a real Redis; and on a real
worker process, RQ's Worker API still shows the truth: busy with the update while it is delivered, idle
after, and a heartbeat that keeps its key alive.
"""

from __future__ import annotations

import dataclasses
import math
import signal
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import pytest
import redis
from rq import Queue, Worker
from rq.serializers import JSONSerializer

import workers.delivery
from receiver.chains import OrderChains
from receiver.settings import Settings
from tests.merchant_handlers import DELIVERED
from tests.sink import Sink, wait_for
from tests.test_workers import EVENTS, post_order, webhook_settings
from workers.delivery import DeliveryContext, use_context
from workers.worker import DeliveryWorker, attempt_death_penalty, attempt_timeout_seconds

# Writing round trips of one delivery, as RQ and the product make them today: RQ's dequeue (LMOVE), its
# two preparation transactions, the job's end heartbeat and its success transaction (the worker's idle
# state in it); the attempt's start (a transaction) and its finish (one script run). RQ's own loop made 19.
WRITES_PER_DELIVERY = 7
SCRIPTS = {b"EVAL", b"EVALSHA", b"FCALL"}
# A write command that, sent on its own, changes nothing in the usual case, and a change of nothing is not
# written to the append-only file: RQ's sweep of a registry's expired entries.
SWEEPS = {b"ZREMRANGEBYSCORE"}


def command_names(packed: Any) -> list[bytes]:
    """The command names in what redis-py sends in one go (one command, or a pipeline's many)."""
    chunks = [packed] if isinstance(packed, bytes | bytearray | memoryview) else packed
    lines = b"".join(bytes(c) for c in chunks).split(b"\r\n")
    names, i = [], 0
    while i < len(lines):
        if lines[i].startswith(b"*") and i + 2 < len(lines):
            names.append(lines[i + 2].upper())
            i += 1 + 2 * int(lines[i][1:])  # past the array's $length and value lines
        else:
            i += 1
    return names


class NotingConnection(redis.Connection):
    """A redis-py connection that notes the command names of every round trip it sends."""

    sent: list[list[bytes]] = []

    def send_packed_command(self, command: Any, check_health: bool = True) -> None:
        NotingConnection.sent.append(command_names(command))
        super().send_packed_command(command, check_health)


@pytest.fixture
def noting_redis(redis_url: str) -> Iterator[redis.Redis]:
    pool = redis.ConnectionPool.from_url(redis_url, connection_class=NotingConnection, socket_timeout=10)
    client = redis.Redis(connection_pool=pool)
    NotingConnection.sent = []
    yield client
    client.close()


def writing(round_trips: list[list[bytes]], write_commands: set[bytes]) -> int:
    """Round trips that make Redis flush its append-only file (with `appendfsync always`)."""
    return sum(
        1
        for names in round_trips
        if names != [*SWEEPS] and any(n in write_commands or n in SCRIPTS for n in names)
    )


async def test_a_delivery_writes_to_redis_in_at_most_seven_round_trips(
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
    write_commands = {
        name.encode().upper()
        for name, info in sync_redis.command().items()
        if "write" in {f.decode() if isinstance(f, bytes) else f for f in info["flags"]}
    }
    monkeypatch.setenv("REDIS_URL", redis_url)
    monkeypatch.setattr(workers.delivery, "_context", None)
    config = settings.with_changes(merchant_handler="tests.merchant_handlers:takes")
    context = DeliveryContext.create(config)
    context = dataclasses.replace(
        context,
        redis=noting_redis,
        chains=OrderChains(noting_redis, context.keys, config.history_retention_seconds),
    )
    use_context(context)
    queue = Queue(context.keys.queue_name, connection=noting_redis, serializer=JSONSerializer)
    worker = DeliveryWorker([queue], connection=noting_redis, serializer=JSONSerializer, worker_ttl=60)
    worker.attempt_timeout = attempt_timeout_seconds(config)
    worker.death_penalty_class = attempt_death_penalty(worker.attempt_timeout)
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    started = time.monotonic()
    try:
        worker.work(burst=True, logging_level="WARNING")
    finally:
        for number, handler in handlers.items():
            signal.signal(number, handler)

    assert sync_redis.llen(DELIVERED) == deliveries
    writes = writing(NotingConnection.sent, write_commands)
    seconds = time.monotonic() - started
    print(f"{writes} writing round trips of {len(NotingConnection.sent)} for {deliveries} deliveries")
    # and the worker's start and end (registration, its death) and a heartbeat a second while it runs
    allowed = WRITES_PER_DELIVERY * deliveries + 20 + math.ceil(seconds)
    assert writes <= allowed, f"{writes / deliveries:.1f} writing round trips per delivery"


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

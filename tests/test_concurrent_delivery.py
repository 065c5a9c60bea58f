"""Deliveries in flight together: DELIVERY_CONCURRENCY per worker process, the deployment-wide bound per
destination (MERCHANT_MAX_IN_FLIGHT), RQ's records of them, and what a kill or a stop does to them.
Real Redis, real worker processes (`intergiro-receiver worker`), real HTTP sinks."""

from __future__ import annotations

import asyncio
import os
import random
import signal
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import redis
from rq import Queue, Worker
from rq.registry import StartedJobRegistry
from rq.serializers import JSONSerializer

from receiver.inflight import LAPSE_SECONDS
from receiver.rediskeys import RedisKeys
from receiver.settings import Settings
from tests.processes import RedisServer
from tests.sink import SECRET, Sink, log_events, wait_for
from tests.test_fanout import ERP_SECRET
from tests.test_workers import EVENTS, post_order, webhook_settings

QUEUE = "order-updates"


def started_jobs(client: Any) -> int:
    return StartedJobRegistry(QUEUE, connection=client, serializer=JSONSerializer).count


def queued_jobs(client: Any) -> int:
    return Queue(QUEUE, connection=client, serializer=JSONSerializer).count


async def post_orders(receiver: Any, key: Any, prefix: str, count: int, events: int = 1) -> list[str]:
    ids: list[str] = []
    for n in range(count):
        ids += await post_order(receiver, key, f"{prefix}{n:05d}", EVENTS[:events])
    return ids


async def test_one_process_keeps_delivery_concurrency_requests_open_and_rq_counts_them(
    receiver: Any, rsa_key: Any, sink: Sink, workers: Any, sync_redis: Any, redis_url: str
) -> None:
    sink.answer = lambda _id, _n: (200, {}, 6.0)
    ids = await post_orders(receiver, rsa_key, "SlowMerchant", 12)
    workers(**webhook_settings(sink, delivery_concurrency=8, delivery_timeout_seconds=10))
    await wait_for(lambda: len(sink.received) >= 8, seconds=60, what="eight requests open at once")
    assert sink.open_now == 8
    assert started_jobs(sync_redis) == 8  # RQ's StartedJobRegistry: each open request is a started job
    [worker] = Worker.all(connection=sync_redis, serializer=JSONSerializer)
    assert worker.get_state() == "busy"
    assert len(worker.get_current_executions(refresh=True)) == 8
    info = await asyncio.to_thread(
        subprocess.run, ["rq", "info", "--url", redis_url, "--serializer", "json", QUEUE],
        capture_output=True, text=True, timeout=30, check=True,
    )  # fmt: skip
    assert "4, 8 executing" in info.stdout and "): busy order-updates" in info.stdout, info.stdout  # rq info
    await asyncio.sleep(0.5)
    assert len(sink.received) == 8  # the ninth waits on the queue for a thread, not started
    assert queued_jobs(sync_redis) == 4
    await wait_for(lambda: len(sink.received) == 12, what="the other four")
    assert sink.most_open == 8
    await wait_for(lambda: started_jobs(sync_redis) == 0, what="every execution ended")
    assert sorted(r.headers["webhook-id"] for r in sink.received) == sorted(ids)
    await wait_for(
        lambda: Worker.all(connection=sync_redis, serializer=JSONSerializer)[0].get_state() == "idle",
        what="the worker idle again",
    )


@pytest.fixture
def two_sinks(make_sink: Callable[..., Any]) -> Callable[..., Any]:
    async def make() -> tuple[Sink, Sink]:
        sinks = (await make_sink(), await make_sink())
        for sink in sinks:
            # answers in 0-20 ms, in no particular order: what would reorder a sloppy concurrent worker
            sink.answer = lambda _id, _n: (200, {}, random.random() / 50)
        return sinks

    return make


async def test_each_orders_updates_arrive_in_sequence_at_two_destinations_with_many_in_flight(
    make_receiver: Any, rsa_key: Any, two_sinks: Any, workers: Any
) -> None:
    merchant, erp = await two_sinks()
    destinations = {
        "destinations": "erp", "destination_erp_url": erp.url, "destination_erp_secret": ERP_SECRET,
    }  # fmt: skip
    env = {k.upper(): v for k, v in destinations.items()}
    receiver = await make_receiver(
        extra_destinations=Settings.from_env(env, dotenv=False).extra_destinations,
        merchant_webhook_url=merchant.url,
        merchant_webhook_secret=SECRET,
    )
    orders = [f"Sequenced{n:05d}" for n in range(2500)]  # thousands of orders, 7,500 updates
    for order_id in orders:  # three events each: two wait behind their order's head
        assert len(await post_order(receiver, rsa_key, order_id, EVENTS)) == 3
    # a generous timeout: a loaded machine answering late must not make a retry (a legitimate second POST)
    settings = {
        **webhook_settings(merchant),
        **destinations,
        "delivery_concurrency": 16,
        "delivery_timeout_seconds": 10,
    }
    workers("--processes", "2", **settings)
    for sink in (merchant, erp):
        await wait_for(
            lambda s=sink: len(s.received) >= 3 * len(orders), seconds=240, what="7,500 deliveries"
        )  # type: ignore[misc]
    for sink in (merchant, erp):
        ids = [r.headers["webhook-id"] for r in sink.received]
        assert len(ids) == len(set(ids)) == 3 * len(orders)  # nothing twice
        by_order: dict[str, list[int]] = {}
        for received in sink.received:
            update = received.update
            by_order.setdefault(update["order_id"], []).append(update["event"]["sequence"])
        assert by_order == {order_id: [0, 1, 2] for order_id in orders}
    assert merchant.most_open > 2 and erp.most_open > 2  # really in flight together


async def test_the_bound_per_destination_holds_across_several_worker_commands(
    receiver: Any, rsa_key: Any, sink: Sink, workers: Any, sync_redis: Any
) -> None:
    sink.answer = lambda _id, _n: (200, {}, 0.3)
    ids = await post_orders(receiver, rsa_key, "Bounded", 60)
    settings = webhook_settings(sink, delivery_concurrency=8, merchant_max_in_flight=5)
    for _ in range(2):  # two commands (pods), two processes each: 32 threads could post
        workers("--processes", "2", **settings)
    await wait_for(lambda: len(sink.received) == 60, seconds=60, what="sixty deliveries")
    assert sink.most_open == 5
    assert sorted(r.headers["webhook-id"] for r in sink.received) == sorted(ids)
    assert all(len(sink.attempts(u)) == 1 for u in ids)
    await wait_for(lambda: not sync_redis.hlen(RedisKeys().pending_updates), what="every delivery recorded")
    attempts = {k.decode(): float(v) for k, v in sync_redis.hgetall(RedisKeys().metrics).items()}
    assert {k: v for k, v in attempts.items() if k.startswith("intergiro_delivery_attempts_total")} == {
        "intergiro_delivery_attempts_total|result=success": 60.0  # waiting for a slot was no attempt
    }


async def test_a_worker_killed_with_many_deliveries_in_flight_loses_nothing_and_keeps_order(
    receiver: Any, rsa_key: Any, sink: Sink, workers: Any, sync_redis: Any, tmp_path: Path
) -> None:
    sink.answer = lambda _id, n: (200, {}, 4.0 if n == 1 else 0.0)  # first attempts still open at the kill
    ids = await post_orders(receiver, rsa_key, "KilledInFlight", 20, events=2)
    firsts = ids[::2]
    settings = webhook_settings(sink, delivery_concurrency=32, delivery_timeout_seconds=5)
    first = workers(**settings)
    await wait_for(lambda: len(sink.received) >= 20, seconds=60, what="twenty deliveries in flight")
    assert {r.headers["webhook-id"] for r in sink.received} == set(firsts)
    assert sink.open_now == 20
    os.kill(first.pid, signal.SIGKILL)
    first.wait(5)
    workers(**settings)
    await wait_for(lambda: len(sink.received) == 60, seconds=60, what="every update delivered")
    for update_id in firsts:  # delivered again, with the same webhook-id, and counted as two attempts
        assert len(sink.attempts(update_id)) == 2
    seconds = ids[1::2]
    assert all(len(sink.attempts(u)) == 1 for u in seconds)
    for n in range(20):  # each order's second update only after its first was answered
        first_at = max(r.at for r in sink.attempts(firsts[n]))
        assert sink.attempts(seconds[n])[0].at >= first_at
    assert sync_redis.hlen(RedisKeys().dead_letters) == 0
    delivered = {e["update"]: e["attempt"] for e in log_events(tmp_path / "worker.log", "update delivered")}
    assert {u: delivered[u] for u in firsts} == dict.fromkeys(firsts, 2)  # the killed attempt counted


async def test_sigterm_takes_no_new_job_and_lets_the_deliveries_in_flight_finish(
    receiver: Any, rsa_key: Any, sink: Sink, workers: Any, sync_redis: Any
) -> None:
    sink.answer = lambda _id, _n: (200, {}, 1.5)
    ids = await post_orders(receiver, rsa_key, "Draining", 15)
    worker = workers(**webhook_settings(sink, delivery_concurrency=10, delivery_timeout_seconds=5))
    await wait_for(lambda: len(sink.received) >= 10, seconds=60, what="ten deliveries in flight")
    worker.send_signal(signal.SIGTERM)
    assert await asyncio.to_thread(worker.wait, 15) == 0  # the sink (this loop) answers meanwhile
    assert len(sink.received) == 10  # no new job taken
    for update_id in [r.headers["webhook-id"] for r in sink.received]:  # each finished: its chain moved on
        assert not sync_redis.exists(RedisKeys().delivery(update_id))
        assert not sync_redis.hexists(RedisKeys().pending_updates, update_id)
    assert started_jobs(sync_redis) == 0
    assert queued_jobs(sync_redis) == 5
    workers(**webhook_settings(sink))
    await wait_for(lambda: len(sink.received) == 15, what="the other five, by the next worker")
    assert sorted(r.headers["webhook-id"] for r in sink.received) == sorted(ids)


async def test_a_delivery_that_overruns_its_timeout_fails_and_holds_up_no_other(
    receiver: Any, rsa_key: Any, sink: Sink, workers: Any, sync_redis: Any
) -> None:
    ids = await post_orders(receiver, rsa_key, "Overrun", 6)
    stuck = ids[0]
    sink.answer = lambda update_id, n: (200, {}, 30.0 if update_id == stuck and n == 1 else 0.0)
    workers(**webhook_settings(sink, delivery_concurrency=4, delivery_timeout_seconds=1))
    await wait_for(
        lambda: {r.headers["webhook-id"] for r in sink.received} >= set(ids[1:]), what="the others"
    )
    assert len(sink.attempts(stuck)) == 1  # the others went while it hung
    await wait_for(lambda: len(sink.attempts(stuck)) == 2, seconds=30, what="its retry")
    await wait_for(lambda: not sync_redis.hexists(RedisKeys().pending_updates, stuck), what="its delivery")
    assert (
        int(sync_redis.hget(RedisKeys().metrics, "intergiro_delivery_attempts_total|result=retryable") or 0)
        == 1
    )


async def test_after_a_redis_restart_mid_flight_delivery_resumes_without_waiting_for_the_leases_to_lapse(
    restartable_redis: RedisServer,
    make_receiver: Any,
    rsa_key: Any,
    sink: Sink,
    workers: Any,
    tmp_path: Path,
) -> None:
    """Redis killed while every slot of the destination is held by a delivery in flight: the loop ends
    on the Redis error, its leases cannot be returned. The process keeps them for its next loop, so
    deliveries go on once Redis is back, instead of waiting LAPSE_SECONDS for the stranded leases."""
    receiver = await make_receiver(redis_url=restartable_redis.url)
    # the first attempts end while Redis is down (for 3 s)
    sink.answer = lambda _id, n: (200, {}, 0.5 if n == 1 else 0.0)
    before = await post_orders(receiver, rsa_key, "BeforeRestart", 4)
    settings = webhook_settings(
        sink, delivery_concurrency=4, merchant_max_in_flight=4, delivery_timeout_seconds=5
    )
    workers(redis_url=restartable_redis.url, **settings)
    await wait_for(lambda: sink.open_now == 4, seconds=30, what="every slot in use")
    client = redis.Redis.from_url(restartable_redis.url)
    assert client.zcard(RedisKeys().in_flight) == 4  # every slot held by the worker's leases, kept on disk
    restartable_redis.kill()
    await asyncio.sleep(3)
    await asyncio.to_thread(restartable_redis.start)  # the same port and append-only file
    after = await post_orders(receiver, rsa_key, "AfterRestart", 4)
    await wait_for(
        lambda: {r.headers["webhook-id"] for r in sink.received} >= set(after),
        seconds=LAPSE_SECONDS / 2,
        what="the updates queued after the restart, well before stranded leases would have lapsed",
    )
    assert log_events(tmp_path / "worker.log", "in-flight leases kept for the next loop: Redis out of reach")
    # those in flight at the kill were answered, but their ends could not be recorded: sent again
    await wait_for(lambda: not client.hlen(RedisKeys().pending_updates), what="every update recorded")
    assert all(len(sink.attempts(u)) == 2 for u in before)
    assert all(len(sink.attempts(u)) == 1 for u in after)
    client.close()

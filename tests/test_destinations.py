"""A destination's state, deployment-wide: pause and resume (CLI, console API), on real worker
processes, a real Redis and a real sink."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest
import redis

from receiver.ops.app import create_ops_app
from receiver.rediskeys import RedisKeys
from receiver.settings import Settings
from tests.processes import stop
from tests.sink import Sink, wait_for
from tests.test_workers import post_order, webhook_settings
from workers.worker import GATE_RECHECK_SECONDS

TOKEN = "ops-test-token-0123456789abcdefghijklmnop"
BEARER = {"Authorization": f"Bearer {TOKEN}"}
EVENTS = ("order", "charge", "refund")
# A worker already waiting for a job when the pause came may still take one: after this, none does.
PAUSE_TAKES_HOLD = GATE_RECHECK_SECONDS + 2


@pytest.fixture
async def ops(aiohttp_client: Any, settings: Settings, sync_redis: redis.Redis) -> Any:
    app = create_ops_app(settings.with_changes(ops_token=TOKEN), redis=sync_redis)
    return await aiohttp_client(app)


def listed(cli: Any) -> dict[str, dict[str, Any]]:
    code, out = cli("destination", "list", "--json")
    assert code == 0
    return {row["destination"]: row for row in json.loads(out)}


async def test_a_pause_holds_every_update_in_order_across_a_restart_of_every_process_and_resume_delivers_them(
    make_receiver: Any, rsa_key: Any, sink: Sink, workers: Any, sync_redis: Any, cli: Any, ops: Any
) -> None:
    env = webhook_settings(sink, delivery_timeout_seconds=10)
    running = workers("--processes", "2", **env)
    receiver = await make_receiver()
    await post_order(receiver, rsa_key, "BeforeThePause01")
    await wait_for(lambda: len(sink.received) == 1, what="a delivery before the pause")
    code, out = cli("destination", "pause", "merchant", "--reason", "merchant deploy")
    assert (code, out.strip()) == (0, "merchant: paused")
    assert cli("destination", "pause", "merchant")[1].strip() == "merchant: already paused"
    await asyncio.sleep(PAUSE_TAKES_HOLD)
    orders = [f"PausedOrder{n:05d}" for n in range(10)]
    for round_ in (1, 2):
        for order_id in orders:
            await post_order(receiver, rsa_key, order_id, EVENTS[:round_])
    await asyncio.sleep(2)
    assert len(sink.received) == 1
    # every process restarts: the workers, the receiver (a new one), the console (its state is Redis')
    stop(running)
    receiver = await make_receiver()
    for order_id in orders:
        await post_order(receiver, rsa_key, order_id, EVENTS)
    workers("--processes", "2", **env)
    await asyncio.sleep(3)
    assert len(sink.received) == 1
    row = listed(cli)["merchant"]
    assert row["state"] == "paused" and row["paused_reason"] == "merchant deploy"
    assert row["paused_by"].startswith("cli:")
    assert (row["in_flight"], row["queued"], row["waiting"], row["retrying"]) == (0, 10, 20, 0)
    assert row["oldest_undelivered_seconds"] >= 3
    assert not list(sync_redis.scan_iter(RedisKeys().delivery("*")))  # no attempt spent
    answer = await ops.post("/api/destinations/merchant/resume", headers=BEARER)
    assert answer.status == 200
    body = await answer.json()
    assert (body["destination"], body["state"], body["changed"]) == ("merchant", "up", True)
    await wait_for(lambda: len(sink.received) >= 31, seconds=60, what="every held update")
    await asyncio.sleep(1)
    ids = [r.headers["webhook-id"] for r in sink.received]
    assert len(ids) == len(set(ids)) == 31
    by_order: dict[str, list[int]] = {}
    for received in sink.received[1:]:
        by_order.setdefault(received.update["order_id"], []).append(received.update["event"]["sequence"])
    assert by_order == {order_id: [0, 1, 2] for order_id in orders}
    row = listed(cli)["merchant"]
    assert (row["state"], row["queued"], row["waiting"], row["oldest_undelivered_seconds"]) == (
        "up",
        0,
        0,
        None,
    )


async def test_the_api_lists_pauses_with_a_reason_and_resumes_a_destination_and_refuses_unknown_ones(
    ops: Any, cli: Any
) -> None:
    assert (await ops.get("/api/destinations")).status == 401
    [row] = await (await ops.get("/api/destinations", headers=BEARER)).json()
    assert (row["destination"], row["state"], row["in_flight"], row["oldest_undelivered_seconds"]) == (
        "merchant",
        "up",
        0,
        None,
    )
    answer = await ops.post(
        "/api/destinations/merchant/pause", headers=BEARER, data=json.dumps({"reason": "maintenance"})
    )
    body = await answer.json()
    assert (answer.status, body["state"], body["paused_reason"], body["paused_by"], body["changed"]) == (
        200,
        "paused",
        "maintenance",
        "ops:bearer",
        True,
    )
    again = await (await ops.post("/api/destinations/merchant/pause", headers=BEARER)).json()
    assert (again["changed"], again["paused_reason"]) == (False, "maintenance")
    assert listed(cli)["merchant"]["state"] == "paused"
    for path in ("/api/destinations/erp/pause", "/api/destinations/erp/resume"):
        answer = await ops.post(path, headers=BEARER)
        assert answer.status == 404 and (await answer.json())["error"] == "not_found"
    bad = await ops.post("/api/destinations/merchant/pause", headers=BEARER, data=b"{not json")
    assert bad.status == 400
    assert (await (await ops.post("/api/destinations/merchant/resume", headers=BEARER)).json())[
        "state"
    ] == "up"
    code, out = cli("destination", "resume", "merchant")
    assert (code, out.strip()) == (0, "merchant: was not paused")
    code, _ = cli("destination", "pause", "erp")
    assert code == 1


async def test_retry_now_delivers_every_retrying_update_at_once_each_order_in_sequence(
    receiver: Any, rsa_key: Any, sink: Sink, workers: Any, sync_redis: Any, cli: Any, ops: Any
) -> None:
    orders = [f"RetryNowOrder{n:03d}" for n in range(5)]
    failing = {(await post_order(receiver, rsa_key, order_id))[0] for order_id in orders}
    sink.answer = lambda id_, n: (503 if n == 1 and id_ in failing else 200, {}, 0.0)  # each first attempt
    await post_order(receiver, rsa_key, orders[0], EVENTS[:2])  # waits behind its order's retrying head
    workers(**webhook_settings(sink, delivery_retry_schedule="1h"))
    await wait_for(lambda: sync_redis.zcard(RedisKeys().retry_schedule) == 5, what="five retries scheduled")
    await asyncio.sleep(2)
    assert len(sink.received) == 5  # an hour away
    answer = await ops.post("/api/retrying/retry-now?destination=erp", headers=BEARER)
    assert answer.status == 404
    code, out = cli("retry-now", "--destination", "merchant")
    assert (code, out.strip()) == (0, "merchant: 5 retrying update(s) made due now")
    await wait_for(lambda: len(sink.received) == 11, seconds=15, what="every retry and the waiting update")
    second_tries = {r.headers["webhook-id"] for r in sink.received[5:]}
    assert len(second_tries) == 6 and sync_redis.zcard(RedisKeys().retry_schedule) == 0
    first_order = [r.update["event"]["sequence"] for r in sink.received if r.update["order_id"] == orders[0]]
    assert first_order == [0, 0, 1]
    answer = await ops.post("/api/retrying/retry-now", headers=BEARER)
    assert (answer.status, await answer.json()) == (200, {"made_due": {"merchant": 0}})
    assert cli("retry-now", "--destination", "erp")[0] == 1


async def test_the_breaker_holds_an_outage_to_one_probe_at_a_time_and_resumes_in_sequence_when_it_is_back(
    receiver: Any, rsa_key: Any, sink: Sink, workers: Any, sync_redis: Any, cli: Any
) -> None:
    """A merchant down (503) for a while: after BREAKER_FAILURES attempts in a row the destination is
    down for every process; updates arriving meanwhile wait and spend no attempt, one probe at a time
    goes out (the sink counts them); once a probe is answered, everything is delivered, each order in
    sequence, the outage's retries at once (their schedule said an hour)."""
    down = True
    delivered: list[dict[str, Any]] = []  # the updates answered 200, in the order they came

    def answer(_id: str, _n: int) -> tuple[int, dict[str, str], float]:
        return (503, {}, 0.2) if down else (200, {}, 0.0)

    sink.answer = answer
    env = webhook_settings(
        sink, delivery_timeout_seconds=10, delivery_retry_schedule="1h", breaker_failures=3,
        breaker_probe_seconds=0.5, breaker_max_probe_seconds=1,
    )  # fmt: skip
    workers("--processes", "2", **env)
    for n in range(5):
        await post_order(receiver, rsa_key, f"BeforeDown{n:06d}")
    await wait_for(lambda: listed(cli)["merchant"]["state"] == "down", what="the destination marked down")
    row = listed(cli)["merchant"]
    assert row["consecutive_failures"] >= 3 and "503" in row["last_error"] and row["down_since"]
    text = cli("destination", "list")[1]
    assert "merchant" in text and "down since" in text and "HTTP 503" in text
    # the attempts in flight when it was marked down end (on a loaded machine, one that passed the gate
    # just before may reach the sink a moment later: twice nothing open, a second apart)
    for _ in range(2):
        await wait_for(lambda: sink.open_now == 0, what="the attempts made before the breaker opened")
        await asyncio.sleep(1)
    before, sink.most_open = len(sink.received), 0
    during = [f"DuringDown{n:06d}" for n in range(10)]
    for order_id in during:
        await post_order(receiver, rsa_key, order_id, EVENTS[:2])
    await asyncio.sleep(5)
    # held still to count: paused, no probe starts (an attempt counted just before reaches the sink)
    assert cli("destination", "pause", "merchant", "--reason", "count the probes")[0] == 0
    await asyncio.sleep(PAUSE_TAKES_HOLD)
    await wait_for(lambda: sink.open_now == 0, what="the last probe answered")
    probes = len(sink.received) - before
    assert 1 <= probes <= 10 and sink.most_open == 1  # one at a time, on the backoff
    attempted = [
        int(sync_redis.hget(RedisKeys().delivery(f"{order_id}-{n}-{kind}"), "attempts") or 0)
        for order_id in during
        for n, kind in enumerate(EVENTS[:2])
    ]
    assert sum(attempted) == probes and max(attempted) <= 1  # only the probes spent attempts
    assert cli("destination", "resume", "merchant")[0] == 0
    assert listed(cli)["merchant"]["state"] == "down"
    down = False
    received_before_up = len(sink.received)
    await wait_for(
        lambda: len({r.headers["webhook-id"] for r in sink.received[received_before_up:]}) >= 25,
        seconds=60, what="every update delivered once the merchant is back",
    )  # fmt: skip
    await asyncio.sleep(1)
    delivered = [r.update for r in sink.received[received_before_up:]]
    assert len(delivered) == len({u["id"] for u in delivered}) == 25  # nothing lost, nothing twice
    assert not sync_redis.hlen(RedisKeys().dead_letters) and not sync_redis.zcard(RedisKeys().retry_schedule)
    assert listed(cli)["merchant"]["state"] == "up"
    for order_id in during:
        assert [u["event"]["sequence"] for u in delivered if u["order_id"] == order_id] == [0, 1]


async def test_metrics_show_each_destination_state_backlog_and_oldest_undelivered_age(
    receiver: Any, rsa_key: Any, cli: Any, ops: Any
) -> None:
    """What the alert rules read (deploy/prometheus/alerts.yml): a paused destination with updates
    queued and waiting, and no worker serving it."""
    assert cli("destination", "pause", "merchant", "--reason", "deploy")[0] == 0
    for n in range(3):
        await post_order(receiver, rsa_key, f"GaugedOrder{n:05d}", EVENTS[:2])
    await asyncio.sleep(1.1)
    metrics = await (await receiver.get("/metrics")).text()
    for line in (
        'intergiro_destination_queued{destination="merchant"} 3.0',
        'intergiro_destination_waiting{destination="merchant"} 3.0',
        'intergiro_destination_retrying{destination="merchant"} 0.0',
        'intergiro_destination_in_flight{destination="merchant"} 0.0',
        'intergiro_destination_workers_alive{destination="merchant"} 0.0',
        'intergiro_destination_state{destination="merchant",state="paused"} 1.0',
        'intergiro_destination_state{destination="merchant",state="up"} 0.0',
    ):
        assert line in metrics, line
    [age] = [
        float(line.split()[-1])
        for line in metrics.splitlines()
        if line.startswith('intergiro_oldest_undelivered_seconds{destination="merchant"}')
    ]
    assert age >= 1.0
    overview = await (await ops.get("/api/overview", headers=BEARER)).json()
    assert overview["deliveries"] == {"merchant": {"delivered": 0, "retry_scheduled": 0, "dead_lettered": 0}}

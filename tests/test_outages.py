"""When Redis or Intergiro's verify endpoint is gone: 503 with Retry-After, and nothing kept."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from typing import Any

import pytest
import redis
import structlog

from receiver.app import create_app
from receiver.intake import needs_replay_guard
from tests.conftest import queued_updates
from tests.helpers import JWT, card_order, token
from tests.processes import RedisServer, free_port


async def test_redis_down_answers_503_and_the_same_post_is_accepted_once_it_is_back(
    aiohttp_client: Any, make_settings: Any, own_redis: RedisServer, rsa_key: Any
) -> None:
    settings = make_settings(redis_url=own_redis.url)
    receiver = await aiohttp_client(create_app(settings))
    body = token(card_order(events=("order", "charge")), rsa_key)
    own_redis.stop()
    answer = await receiver.post("/callbacks/intergiro", data=body, headers=JWT)
    assert answer.status == 503
    assert int(answer.headers["Retry-After"]) > 0
    assert (await receiver.get("/readyz")).status == 503
    own_redis.start()
    client = redis.Redis.from_url(own_redis.url)
    assert list(client.scan_iter("*")) == []  # nothing half-written
    again = await receiver.post("/callbacks/intergiro", data=body, headers=JWT)
    assert again.status == 200
    assert (await again.json())["queued"] == ["TestOrder0000001-0-order", "TestOrder0000001-1-charge"]
    assert len(queued_updates(client, settings)) == 2
    client.close()


@pytest.mark.parametrize("status", [500, 502, 503, 429])
async def test_verify_endpoint_failing_answers_503_and_keeps_nothing(
    remote_receiver: Any, fake_intergiro: Any, sync_redis: Any, rsa_key: Any, status: int
) -> None:
    fake_intergiro.state["status"] = status
    receiver = await remote_receiver()
    answer = await receiver.post("/callbacks/intergiro", data=token(card_order(), rsa_key), headers=JWT)
    assert answer.status == 503
    assert "Retry-After" in answer.headers
    assert list(sync_redis.scan_iter("*")) == []


async def test_verify_endpoint_refusing_answers_401(
    remote_receiver: Any, fake_intergiro: Any, sync_redis: Any, rsa_key: Any
) -> None:
    fake_intergiro.state["status"] = 401
    receiver = await remote_receiver()
    answer = await receiver.post("/callbacks/intergiro", data=token(card_order(), rsa_key), headers=JWT)
    assert answer.status == 401
    assert list(sync_redis.scan_iter("*")) == []


async def test_verify_endpoint_unreachable_answers_503(
    make_receiver: Any, sync_redis: Any, stranger_key: Any
) -> None:
    from tests.processes import free_port

    receiver = await make_receiver(
        intergiro_verify="local-then-remote",
        intergiro_api_url=f"http://127.0.0.1:{free_port()}",
        intergiro_api_key="k",
    )
    # signed by no trusted key, so local-then-remote asks the (dead) endpoint
    answer = await receiver.post("/callbacks/intergiro", data=token(card_order(), stranger_key), headers=JWT)
    assert answer.status == 503
    assert list(sync_redis.scan_iter("*")) == []


async def test_local_then_remote_does_not_call_the_endpoint_when_a_local_key_verifies(
    remote_receiver: Any, fake_intergiro: Any, rsa_key: Any
) -> None:
    receiver = await remote_receiver(intergiro_verify="local-then-remote")
    answer = await receiver.post("/callbacks/intergiro", data=token(card_order(), rsa_key), headers=JWT)
    assert answer.status == 200
    assert fake_intergiro.state["calls"] == 0


async def test_verify_endpoint_too_slow_answers_503(
    aiohttp_server: Any, make_receiver: Any, sync_redis: Any, stranger_key: Any
) -> None:
    import asyncio

    from aiohttp import web

    async def slow(request: web.Request) -> web.Response:
        await asyncio.sleep(5)
        return web.json_response({})

    app = web.Application()
    app.router.add_post("/v1/worker-order/order/verify", slow)
    server = await aiohttp_server(app)
    receiver = await make_receiver(
        intergiro_verify="remote", intergiro_api_url=str(server.make_url("")).rstrip("/"), intergiro_api_key="k",
        intergiro_api_timeout_seconds=0.3,
    )  # fmt: skip
    answer = await receiver.post("/callbacks/intergiro", data=token(card_order(), stranger_key), headers=JWT)
    assert answer.status == 503
    assert list(sync_redis.scan_iter("*")) == []


async def test_with_min_replicas_a_callback_no_replica_holds_is_answered_503(
    make_receiver: Any, rsa_key: Any
) -> None:
    """The primary alone is not enough: a failover could lose what no replica has, so the sender retries."""
    receiver = await make_receiver(redis_min_replicas=1)
    answer = await receiver.post("/callbacks/intergiro", data=token(card_order(), rsa_key), headers=JWT)
    assert answer.status == 503
    assert "Retry-After" in answer.headers


async def test_with_min_replicas_a_callback_a_replica_holds_is_accepted(
    aiohttp_client: Any, make_settings: Any, rsa_key: Any
) -> None:
    primary, replica = RedisServer(), RedisServer()
    primary.start()
    replica.start()
    try:
        redis.Redis(port=replica.port).replicaof("127.0.0.1", primary.port)
        receiver = await aiohttp_client(
            create_app(make_settings(redis_url=primary.url, redis_min_replicas=1))
        )
        body = token(card_order(), rsa_key)
        for _ in range(50):  # the replica needs a moment for its first sync
            answer = await receiver.post("/callbacks/intergiro", data=body, headers=JWT)
            if answer.status == 200:
                break
        assert answer.status == 200
        assert redis.Redis(port=replica.port).exists("rq:job:TestOrder0000001-0-order")
    finally:
        primary.cleanup()
        replica.cleanup()


async def test_a_redis_that_hangs_gets_every_callback_503_within_the_deadline_and_recovers_by_itself(
    aiohttp_client: Any, make_settings: Any, own_redis: RedisServer, rsa_key: Any
) -> None:
    """SIGSTOP: connections are accepted by the kernel and never answered. Every callback (one after
    another and many at once) and /readyz are answered 503 within REDIS_TIMEOUT_SECONDS (and a margin
    for this shared machine); SIGCONT: accepted again, with no restart; every 200 is in Redis."""
    deadline = 1.0
    settings = make_settings(redis_url=own_redis.url, redis_timeout_seconds=deadline)
    receiver = await aiohttp_client(create_app(settings))
    first = await receiver.post(
        "/callbacks/intergiro", data=token(card_order("HangOrder0"), rsa_key), headers=JWT
    )
    assert first.status == 200
    assert own_redis.process is not None
    pid = own_redis.process.pid
    os.kill(pid, signal.SIGSTOP)
    try:

        async def timed(coroutine: Any) -> tuple[float, Any]:
            started = time.monotonic()
            answer = await asyncio.wait_for(coroutine, deadline + 10)  # a hang fails, not waits
            return time.monotonic() - started, answer

        def post(n: int) -> Any:
            # odd: one event, straight to the intake script; even: forty, heavy enough for the replay
            # guard's read first (Intake.new_events)
            events = ("order",) if n % 2 else ("order", "charge", *["refund"] * 38)
            body = token(card_order(f"HangOrder{n}", events=events, items=100_000), rsa_key)
            assert needs_replay_guard(len(events), len(body)) == (n % 2 == 0)
            return receiver.post("/callbacks/intergiro", data=body, headers=JWT)

        for n in range(1, 4):  # one after another: each must take a fresh connection, none may hang
            elapsed, answer = await timed(post(n))
            assert answer.status == 503, await answer.text()
            assert int(answer.headers["Retry-After"]) > 0
            assert elapsed < deadline + 0.75
        elapsed, ready = await timed(receiver.get("/readyz"))
        assert ready.status == 503 and elapsed < deadline + 0.75
        many = await asyncio.gather(*(timed(post(n)) for n in range(10, 30)), timed(receiver.get("/readyz")))
        assert {answer.status for _, answer in many} == {503}
        assert max(elapsed for elapsed, _ in many) < deadline + 2.5
        elapsed, scrape = await timed(receiver.get("/metrics"))
        assert scrape.status == 200 and elapsed < deadline + 1.5
    finally:
        os.kill(pid, signal.SIGCONT)
    again = await receiver.post(
        "/callbacks/intergiro", data=token(card_order("HangOrder99"), rsa_key), headers=JWT
    )
    assert again.status == 200, await again.text()
    assert (await receiver.get("/readyz")).status == 200
    client = redis.Redis.from_url(own_redis.url)
    queued = {u["order_id"] for u in queued_updates(client, settings)}
    client.close()
    assert {"HangOrder0", "HangOrder99"} <= queued  # every 200 is stored (a 503's writes may land late)


@pytest.mark.parametrize(
    ("refuse", "refusal"),
    [
        (lambda client: client.config_set("maxmemory", 1), "out of memory"),  # deploy/redis.conf: noeviction
        (lambda client: client.replicaof("127.0.0.1", free_port()), "read-only"),
    ],
)
async def test_a_redis_refusing_writes_is_named_in_the_503_counted_and_logged_once_as_an_error(
    aiohttp_client: Any, make_settings: Any, own_redis: RedisServer, rsa_key: Any, refuse: Any, refusal: str
) -> None:
    receiver = await aiohttp_client(create_app(make_settings(redis_url=own_redis.url)))
    client = redis.Redis.from_url(own_redis.url)
    client.config_set("maxmemory-policy", "noeviction")
    refuse(client)
    with structlog.testing.capture_logs() as logs:
        for n in range(3):
            body = token(card_order(f"RefusedWrite0000{n}"), rsa_key)
            answer = await receiver.post("/callbacks/intergiro", data=body, headers=JWT)
            assert (answer.status, (await answer.json())["reason"]) == (
                503, f"redis refused the write ({refusal}); nothing was stored"
            )  # fmt: skip
    assert [(line["refusal"], line["since_last_line"]) for line in logs if line["log_level"] == "error"] == [
        (refusal, 0)
    ]
    metrics = await (await receiver.get("/metrics")).text()
    assert (
        f'intergiro_redis_write_refusals_total{{reason="{refusal.replace("-", "_").replace(" ", "_")}"}} 3.0'
        in metrics
    )
    assert client.dbsize() == 0
    client.close()

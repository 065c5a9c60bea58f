"""Dedup + enqueue under concurrency: callbacks arriving together are stored together, yet each
caller gets its own answer; a Redis that lost its scripts is served all the same, and one that stops
answering fails its batch in time without confusing the next."""

from __future__ import annotations

import asyncio
import signal
import time
from typing import Any

import pytest
import redis
import redis.asyncio
from redis.exceptions import RedisError

from receiver.intake import Intake
from receiver.order import build_updates, parse_order
from receiver.rediskeys import RedisKeys
from tests.conftest import queued_updates
from tests.helpers import JWT, card_order, token
from tests.processes import RedisServer


def order_id(index: int) -> str:
    return f"Concurrent{index:06d}"


async def post_all(receiver: Any, bodies: list[bytes]) -> list[dict[str, Any]]:
    answers = await asyncio.gather(
        *(receiver.post("/callbacks/intergiro", data=body, headers=JWT) for body in bodies)
    )
    assert [a.status for a in answers] == [200] * len(bodies)
    return [await a.json() for a in answers]


async def test_concurrent_callbacks_of_different_orders_each_get_their_own_answer(
    receiver: Any, sync_redis: Any, settings: Any, rsa_key: Any
) -> None:
    bodies = [token(card_order(order_id(i), events=("order", "charge")), rsa_key) for i in range(30)]
    answers = await post_all(receiver, bodies)
    assert answers == [
        {"status": "accepted", "order": order_id(i), "queued": [f"{order_id(i)}-0-order",
         f"{order_id(i)}-1-charge"], "duplicates": 0}
        for i in range(30)
    ]  # fmt: skip
    assert len(queued_updates(sync_redis, settings)) == 60
    replays = await post_all(receiver, bodies[:5])
    assert [a["status"] for a in replays] == ["duplicate"] * 5


async def test_callbacks_are_stored_after_redis_forgot_the_intake_script(
    receiver: Any, sync_redis: Any, settings: Any, rsa_key: Any
) -> None:
    await post_all(receiver, [token(card_order(order_id(0)), rsa_key)])
    sync_redis.script_flush()
    answers = await post_all(receiver, [token(card_order(order_id(i)), rsa_key) for i in range(1, 6)])
    assert [a["status"] for a in answers] == ["accepted"] * 5
    assert len(queued_updates(sync_redis, settings)) == 6


async def test_a_redis_that_stops_answering_fails_the_batch_in_time_and_later_batches_get_their_own_answers(
    settings: Any,
) -> None:
    """A frozen Redis: the batch fails within its deadline with a RedisError (the receiver answers 503);
    its connection is dropped, so the next batch never reads the frozen batch's late answers as its own;
    and the frozen batch's updates, run once Redis wakes up, are there once (the retry is a duplicate)."""
    server = RedisServer()
    server.start()
    assert server.process is not None
    client = redis.asyncio.Redis.from_url(server.url)  # no socket timeout, as the receiver's intake
    intake = Intake(client, RedisKeys(), settings.dedup_ttl_seconds, timeout_seconds=0.5)
    updates = [build(i) for i in range(3)]
    try:
        assert await intake.store(updates[0]) == [updates[0][0]["id"]]
        server.process.send_signal(signal.SIGSTOP)
        started = time.monotonic()
        with pytest.raises(RedisError):
            await intake.store(updates[1])
        assert time.monotonic() - started < 2
        server.process.send_signal(signal.SIGCONT)
        assert await intake.store(updates[2]) == [updates[2][0]["id"]]
        assert await intake.store(updates[1]) == []  # the frozen batch ran when Redis woke up
        sync = redis.Redis.from_url(server.url)
        assert sorted(k.decode() for k in sync.scan_iter("rq:job:*")) == sorted(
            f"rq:job:{u[0]['id']}" for u in updates
        )
        sync.close()
    finally:
        if server.process is not None:
            server.process.send_signal(signal.SIGCONT)
        await client.aclose()
        server.cleanup()


def build(index: int) -> list[dict[str, Any]]:
    order = parse_order(card_order(order_id(100 + index)))
    return build_updates(order, received_at="2026-11-23T12:00:00.000Z", verified_by="local:test")

"""Dedup + enqueue under concurrency: callbacks arriving together are stored together, yet each
caller gets its own answer, and a Redis that lost its scripts is served all the same."""

from __future__ import annotations

import asyncio
from typing import Any

from tests.conftest import queued_updates
from tests.helpers import JWT, card_order, token


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

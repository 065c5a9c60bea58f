"""`intergiro-receiver trace KEY`: an order's story, from its history (receiver.history) and where its
updates are now, as their records tell it: the order's chain (receiver.chains), the retry schedule
(receiver.retries) and the dead-letter queue (receiver.deadletters)."""

from __future__ import annotations

from typing import Any

import orjson
from redis import Redis

from receiver.chains import read_chain
from receiver.connections import sync_redis
from receiver.deadletters import read_dead_lettered
from receiver.errors import clip
from receiver.history import LiveState, find_orders, named_updates, read_entries, render, story
from receiver.rediskeys import RedisKeys
from receiver.retries import read_due
from receiver.settings import Settings


def live_state(redis: Redis, keys: RedisKeys, order_id: str, update_ids: list[str]) -> LiveState:
    """Where the order's updates are now (one round trip)."""
    with redis.pipeline(transaction=False) as pipe:
        read_chain(pipe, keys, order_id)
        for update_id in update_ids:
            read_due(pipe, keys, update_id)
        for update_id in update_ids:
            read_dead_lettered(pipe, keys, update_id)
        answers = pipe.execute()
    head, waiting = answers[0], answers[1]
    n = len(update_ids)
    return LiveState(
        head=head.decode() if head else None,
        waiting=frozenset(w.decode() for w in waiting),
        retrying=frozenset(
            u for u, due in zip(update_ids, answers[2 : 2 + n], strict=True) if due is not None
        ),
        dead_lettered=frozenset(u for u, dead in zip(update_ids, answers[2 + n :], strict=True) if dead),
    )


def trace(redis: Redis, keys: RedisKeys, key: str) -> list[dict[str, Any]]:
    """The story of every order KEY names (an order id, an update id or a merchant order number),
    newest first; empty when nothing is known."""
    documents = []
    for order_id in find_orders(redis, keys, key):
        entries = read_entries(redis, keys, order_id)
        ids = named_updates(entries, order_id)
        documents.append(story(entries, order_id, live_state(redis, keys, order_id, ids)))
    return documents


def run_trace(settings: Settings, key: str, *, as_json: bool = False) -> int:
    """`intergiro-receiver trace KEY [--json]`: 0 when something is known, 1 when nothing is."""
    redis = sync_redis(settings, timeout=10)
    try:
        documents = trace(redis, RedisKeys.of(settings), key)
    finally:
        redis.close()
    if not documents:
        print(
            f"trace: nothing is known of {clip(key, 80)!r} (history is kept {settings.history_retention_seconds} s)"
        )
        return 1
    if as_json:
        print(
            orjson.dumps(
                documents[0] if len(documents) == 1 else documents, option=orjson.OPT_INDENT_2
            ).decode()
        )
        return 0
    for n, document in enumerate(documents):
        if n:
            print()
        print("\n".join(render(document)))
    return 0

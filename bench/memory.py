"""bench/memory: Redis bytes per remembered (order id, event) marker, and per event of an order's history.

Stores N two-event orders through the real `Intake.store` (the same Lua step the receiver runs) on a
Redis of its own, then deletes the RQ jobs, the queue, the per-order ordering keys and the copies of the
unfinished updates, so that only the dedup markers remain (they are what outlives delivery:
DEDUP_TTL_SECONDS, 400 days by default), and
divides the growth of `used_memory` by the number of events remembered.

Then, on the emptied server, it tells N usual order stories (ordered, charged, refunded: three
callbacks, each event delivered at its first attempt) through the real intake and finish scripts with
the history on, keeps only the history (what outlives delivery for HISTORY_RETENTION_SECONDS), and
divides its memory by the number of events.
"""

from __future__ import annotations

import argparse
import asyncio

import redis
from redis.asyncio import Redis

from bench.tokens import bench_order
from receiver.chains import OrderChains
from receiver.history import attempt_entry, callback_note
from receiver.intake import Intake
from receiver.order import build_updates, parse_order
from receiver.rediskeys import RedisKeys
from receiver.request_ids import request_id
from receiver.settings import Settings
from tests.processes import RedisServer

TARGET_BYTES = 128
HISTORY_TARGET_BYTES = 600
STORY = ("order", "charge", "refund")


def used_memory(client: redis.Redis) -> int:
    return int(client.info("memory")["used_memory"])


async def store_orders(url: str, orders: int) -> None:
    client = Redis.from_url(url)
    intake = Intake(client, RedisKeys(), Settings().dedup_ttl_seconds)
    batch = 50  # concurrent stores: redis-py's pool holds 100 connections
    for start in range(0, orders, batch):
        updates = [
            build_updates(parse_order(bench_order(i)), received_at="2026-01-01T09:00:06.000Z",
                          verified_by="local:bench")
            for i in range(start, min(start + batch, orders))
        ]  # fmt: skip
        stored = await asyncio.gather(*(intake.store(u) for u in updates))
        assert all(len(ids) == 2 for ids in stored), "an event was not new"
    await client.aclose()


async def tell_stories(url: str, orders: int) -> None:
    """Three callbacks per order (each carrying the events so far), each new event delivered at once."""
    client = Redis.from_url(url)
    keys, ttl = RedisKeys(), Settings().history_retention_seconds
    intake = Intake(client, keys, Settings().dedup_ttl_seconds, history_ttl=ttl)
    chains = OrderChains(redis.Redis.from_url(url), keys, ttl)
    at = "2026-01-01T09:00:06.000Z"
    for step in range(1, len(STORY) + 1):
        for start in range(0, orders, 50):
            batch = []
            for i in range(start, min(start + 50, orders)):
                order = {**bench_order(i), "event": [{"type": t, "date": at} for t in STORY[:step]]}
                updates = build_updates(parse_order(order), received_at=at, verified_by="local:bench")
                note = callback_note(at, "local:intergiro-production", request_id({}), order["number"])
                batch.append((updates, note))
            stored = await asyncio.gather(*(intake.store(u, at, note) for u, note in batch))
            for (updates, _), ids in zip(batch, stored, strict=True):
                [update] = [u for u in updates if u["id"] in ids]
                chains.redis.hset(keys.delivery(update["id"]), "attempts", 1)
                entry = attempt_entry(
                    update["id"], update["order_id"], at, "webhook", "delivered", 200, None, 12.3
                )
                chains.finish(update, history=entry)
    await client.aclose()


def delete_all_but_markers(client: redis.Redis) -> int:
    # what delivery leaves behind: jobs, order chains, the set of orders with a pending head and the
    # copies of unfinished updates are gone
    deleted = int(client.unlink(RedisKeys().active_orders, RedisKeys().pending_updates))
    for pattern in ("rq:*", "igr:order:*"):
        batch = []
        for key in client.scan_iter(pattern, count=10_000):
            batch.append(key)
            if len(batch) == 10_000:
                deleted += client.unlink(*batch)
                batch = []
        if batch:
            deleted += client.unlink(*batch)
    return deleted


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench/memory", description=__doc__.split("\n")[0])
    parser.add_argument("--orders", type=int, default=50_000, help="two-event orders (default 50000)")
    args = parser.parse_args(argv)
    server = RedisServer()
    server.start()
    try:
        client = redis.Redis.from_url(server.url)
        before = used_memory(client)
        asyncio.run(store_orders(server.url, args.orders))
        with_jobs = used_memory(client)
        delete_all_but_markers(client)
        client.memory_purge()
        after = used_memory(client)
        events = args.orders * 2
        sample = RedisKeys().seen(bench_order(0)["id"])
        per_event = (after - before) / events
        print(f"redis-server {client.info('server')['redis_version']}")
        print(f"{args.orders:,} orders x 2 events = {events:,} callbacks' events remembered")
        print(f"used_memory: {before:,} before, {with_jobs:,} with jobs queued, {after:,} markers only")
        print(f"marker: {sample} -> {client.hgetall(sample)}, encoding {client.object('encoding', sample)}, "
              f"TTL {client.ttl(sample)} s; {client.dbsize():,} keys left")  # fmt: skip
        print(f"queued (jobs + markers): {(with_jobs - before) / events:,.0f} bytes per event")
        print(f"remembered (markers only): {per_event:,.1f} bytes per event"
              f" (target <= {TARGET_BYTES}: {'met' if per_event <= TARGET_BYTES else 'NOT met'})")  # fmt: skip
        markers_left = client.dbsize()

        client.flushall()
        client.memory_purge()
        before = used_memory(client)
        asyncio.run(tell_stories(server.url, args.orders))
        delete_all_but_markers(client)
        for key in client.scan_iter("igr:seen:*", count=10_000):
            client.unlink(key)
        client.unlink(RedisKeys().metrics)
        client.memory_purge()
        history = used_memory(client) - before
        sample = RedisKeys().history(bench_order(0)["id"])
        per_story_event = history / (args.orders * len(STORY))
        print(f"history: {args.orders:,} stories of {len(STORY)} callbacks, each event delivered at once; "
              f"{client.dbsize():,} keys left (history lists and number index)")  # fmt: skip
        print(f"history sample {sample}: {client.llen(sample)} entries, encoding {client.object('encoding', sample)}, "
              f"{client.memory_usage(sample)} bytes (MEMORY USAGE), TTL {client.ttl(sample)} s")  # fmt: skip
        print(f"history: {per_story_event:,.1f} bytes per event (target <= {HISTORY_TARGET_BYTES}: "
              f"{'met' if per_story_event <= HISTORY_TARGET_BYTES else 'NOT met'}); "
              f"the dedup marker beside it: {per_event:,.1f} bytes per event")  # fmt: skip
        return 0 if markers_left == args.orders else 1
    finally:
        server.cleanup()


if __name__ == "__main__":
    raise SystemExit(main())

"""`intergiro-receiver replay`: a window of updates sent again to one destination, rebuilt from
Intergiro's order list (a fake of it), in each order's sequence, marked as replays, other destinations
untouched; `--dry-run` changes nothing. Real Redis, real worker processes, real sinks, the real command."""

from __future__ import annotations

import asyncio
import json
import os
from datetime import UTC, datetime
from typing import Any

from receiver.app import CALLBACK_PATH
from receiver.history import read_entries
from receiver.rediskeys import RedisKeys
from receiver.settings import Settings
from tests.helpers import JWT, card_order, token
from tests.processes import run_command, worker_env
from tests.sink import SECRET, Sink, wait_for
from tests.test_fanout import ERP_SECRET
from tests.test_workers import EVENTS

ORDERS = [f"Replayed{n:08d}" for n in range(5)]


def today_order(order_id: str) -> dict[str, Any]:
    return card_order(order_id, EVENTS, created=datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.000Z"))


async def replay(redis_url: str, env: dict[str, str], *args: str) -> tuple[int, str, str]:
    """The real command, off this loop (the fake order list answers on it)."""
    done = await asyncio.to_thread(run_command, "replay", *args, env=worker_env(redis_url, **env))
    return done.returncode, done.stdout, done.stderr


async def test_replay_sends_a_window_again_to_one_destination_in_sequence_marked_as_replays(
    make_receiver: Any, make_sink: Any, rsa_key: Any, workers: Any, sync_redis: Any, redis_url: str,
    order_api: Any,
) -> None:  # fmt: skip
    merchant, erp = await make_sink(), await make_sink()
    env = {
        "merchant_webhook_url": merchant.url, "merchant_webhook_secret": SECRET, "destinations": "erp",
        "destination_erp_url": erp.url, "destination_erp_secret": ERP_SECRET,
        "intergiro_api_url": str(order_api.make_url("")).rstrip("/"), "intergiro_api_key": "test-api-key",
    }  # fmt: skip
    extra = Settings.from_env({k.upper(): v for k, v in env.items()}, dotenv=False).extra_destinations
    receiver = await make_receiver(
        extra_destinations=extra, merchant_webhook_url=merchant.url, merchant_webhook_secret=SECRET
    )
    for order_id in ORDERS:
        order = today_order(order_id)
        order_api.state["orders"].append(order)
        answer = await receiver.post(CALLBACK_PATH, data=token(order, rsa_key), headers=JWT)
        assert answer.status == 200
    workers(**env)
    await wait_for(lambda: len(merchant.received) == 15 and len(erp.received) == 15, what="first deliveries")
    await wait_for(lambda: not sync_redis.hlen(RedisKeys().pending_updates), what="every update finished")
    first_ids = sorted(r.headers["webhook-id"] for r in erp.received)

    code, out, err = await replay(
        redis_url, env, "--destination", "erp", "--since", "1d", "--dry-run", "--json"
    )
    assert code == 0, err
    assert json.loads(out)["would_queue"] == 15
    await asyncio.sleep(1)
    assert len(erp.received) == 15 and not sync_redis.hlen(RedisKeys().pending_updates)  # nothing changed

    code, out, err = await replay(redis_url, env, "--destination", "erp", "--since", "1d", "--json")
    assert code == 0, err
    assert json.loads(out)["queued"] == 15
    await wait_for(lambda: len(erp.received) == 30, what="the replayed deliveries")
    replayed = erp.received[15:]
    assert sorted(r.headers["webhook-id"] for r in replayed) == first_ids  # same ids: idempotent for erp
    assert all(r.headers.get("webhook-replay") == "1" for r in replayed)
    assert all(r.headers.get("Idempotency-Key") == r.headers["webhook-id"] for r in replayed)
    by_order: dict[str, list[int]] = {}
    for received in replayed:
        by_order.setdefault(received.update["order_id"], []).append(received.update["event"]["sequence"])
    assert by_order == {o: [0, 1, 2] for o in ORDERS}  # in each order's sequence
    assert len(merchant.received) == 15  # the other destination untouched
    await wait_for(lambda: not sync_redis.hlen(RedisKeys().pending_updates), what="the replay finished")
    attempts = [e for e in read_entries(sync_redis, RedisKeys(), ORDERS[0]) if e["kind"] == "attempt"]
    assert sum(1 for e in attempts if e.get("replay")) == 3  # the history tells the replays apart
    assert any(e["kind"] == "replay" for e in read_entries(sync_redis, RedisKeys(), ORDERS[0]))
    code, out, _ = await replay(redis_url, env, "--destination", "erp", "--since", "1d", "--order", ORDERS[0])
    assert code == 0 and "queued 3" in out  # one order only


async def test_a_replay_is_bounded_and_one_runs_per_destination_at_a_time(
    sync_redis: Any, redis_url: str, order_api: Any, make_sink: Any
) -> None:
    erp: Sink = await make_sink()
    env = {
        "destinations": "erp", "destination_erp_url": erp.url, "destination_erp_secret": ERP_SECRET,
        "intergiro_api_url": str(order_api.make_url("")).rstrip("/"), "intergiro_api_key": "test-api-key",
    }  # fmt: skip
    code, _, err = await replay(redis_url, env, "--destination", "erp", "--since", "30d")
    assert code == 2 and "REPLAY_MAX_WINDOW_SECONDS" in err
    code, _, err = await replay(redis_url, env, "--destination", "warehouse", "--since", "1d")
    assert code == 2 and "not a configured destination" in err
    sync_redis.set(RedisKeys().for_destination("erp").replay_lock, "another replay's token")
    code, _, err = await replay(redis_url, env, "--destination", "erp", "--since", "1d")
    assert code == 1 and "running already" in err
    assert not order_api.state["requests"]  # refused before reading anything
    assert os.environ.get("REPLAY_MAX_WINDOW_SECONDS") is None

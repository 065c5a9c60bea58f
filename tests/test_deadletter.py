"""The dead-letter queue as ops use it: `intergiro-receiver dlq ...` against real workers and a sink."""

from __future__ import annotations

import json
from typing import Any

import pytest

from receiver.destinations import Destination
from receiver.rediskeys import RedisKeys
from receiver.settings import Settings
from tests.deadletter_seed import seed_dead_letters
from tests.sink import Sink, wait_for
from tests.test_workers import post_dead_lettered, post_order, webhook_settings


@pytest.fixture
def worker(workers: Any, sink: Sink) -> Any:
    return workers(**webhook_settings(sink))


async def test_a_400_dead_letters_after_one_attempt_and_ops_can_list_requeue_and_purge_it(
    receiver: Any, rsa_key: Any, sink: Sink, worker: Any, cli: Any, sync_redis: Any
) -> None:
    refused = {"yes"}
    sink.answer = lambda _id, _n: (400, {}, 0.0) if refused else (200, {}, 0.0)
    update_id = await post_dead_lettered(receiver, rsa_key, sync_redis, "RefusedOrder0001")
    assert len(sink.attempts(update_id)) == 1

    code, out = cli("dlq", "list", "--json")
    [entry] = json.loads(out)
    assert code == 0
    assert (entry["id"], entry["attempts"], entry["last_error"]) == (
        update_id,
        1,
        "merchant answered HTTP 400",
    )
    assert entry["update"]["id"] == update_id and entry["last_error_at"]
    metrics = await (await receiver.get("/metrics")).text()
    assert "intergiro_dead_letter_depth 1.0" in metrics
    assert 'intergiro_deliveries_total{outcome="dead_lettered"} 1.0' in metrics
    assert 'intergiro_delivery_attempts_total{result="permanent"} 1.0' in metrics

    refused.clear()
    assert cli("dlq", "requeue", update_id)[0] == 0
    await wait_for(lambda: len(sink.attempts(update_id)) == 2, what="the requeued delivery")
    await wait_for(lambda: not sync_redis.exists(RedisKeys().order_head("RefusedOrder0001")))
    assert cli("dlq", "list", "--json")[1].strip() == "[]"

    refused.add("yes")
    [second] = await post_order(receiver, rsa_key, "RefusedOrder0001", ("order", "charge"))
    await wait_for(
        lambda: sync_redis.hexists(RedisKeys().dead_letters, second), what="the second dead letter"
    )
    assert cli("dlq", "show", second)[0] == 0
    assert cli("dlq", "purge", second) == (0, f"purged {second}\n")
    assert sync_redis.hlen(RedisKeys().dead_letters) == 0
    assert cli("dlq", "show", second)[0] == 1
    assert cli("dlq", "requeue", second)[0] == 1


async def test_a_dead_lettered_update_releases_its_order_and_requeue_delivers_it_after_the_head(
    receiver: Any, rsa_key: Any, sink: Sink, worker: Any, cli: Any, sync_redis: Any
) -> None:
    sink.answer = lambda update_id, n: (
        (422, {}, 0.0) if update_id.endswith("-0-order") and n == 1 else (200, {}, 0.0)
    )
    first, second = await post_order(receiver, rsa_key, "GapOrder00000001", ("order", "charge"))
    await wait_for(lambda: len(sink.attempts(second)) == 1, what="the later update, past the dead letter")
    assert cli("dlq", "requeue", "--all") == (0, "1 update(s) requeued\n")
    await wait_for(lambda: len(sink.attempts(first)) == 2, what="the requeued update")
    assert [r.update["event"]["sequence"] for r in sink.received] == [0, 1, 0]


def exec_calls(client: Any) -> int:
    """How many MULTI/EXEC transactions Redis ran (its own statistics)."""
    return int(client.info("commandstats").get("cmdstat_exec", {}).get("calls", 0))


def test_dlq_requeue_and_purge_all_apply_a_filter_in_batches_over_thousands_of_dead_letters(
    cli: Any, sync_redis: Any, make_settings: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings: Settings = make_settings(
        extra_destinations=(Destination("erp", handler="tests.merchant_handlers:books"),),
        merchant_handler="tests.merchant_handlers:takes",
    )
    seed_dead_letters(sync_redis, settings, 3_000, "Refused")
    seed_dead_letters(sync_redis, settings, 400, "Gone", error="merchant answered HTTP 410", http_status=410)
    seed_dead_letters(sync_redis, settings, 300, "Unanswered", "erp", "POST failed: ConnectError", None)
    keys = RedisKeys()
    # erp is configured here; `requeue --all` below runs without it, as after it was removed.
    monkeypatch.setenv("MERCHANT_HANDLER", "tests.merchant_handlers:takes")

    assert cli("dlq", "purge", "--all", "--status", "teapot")[0] == 2  # a filter it cannot use: nothing
    assert cli("dlq", "purge", "--all", "--newer-than", "soon")[0] == 2
    assert sync_redis.hlen(keys.dead_letters) == 3_700

    sync_redis.config_resetstat()
    code, out = cli("dlq", "purge", "--all", "--status", "410", "--newer-than", "1h")
    assert (code, out) == (0, "400 update(s) purged matching status=410 newer_than=3600\n")
    assert exec_calls(sync_redis) == 1  # 400 entries: one transaction, not 400
    assert not any(sync_redis.hexists(keys.dead_letters, f"Gone{n:07d}-0-order") for n in range(400))
    assert cli("dlq", "purge", "--all", "--older-than", "1h") == (
        0,
        "0 update(s) purged matching older_than=3600\n",
    )

    sync_redis.config_resetstat()
    code, out = cli("dlq", "requeue", "--all", "--text", "refused0001")  # Refused0001000 ... Refused0001999
    assert (code, out) == (0, "1000 update(s) requeued matching text=refused0001\n")
    assert int(sync_redis.info("commandstats")["cmdstat_evalsha"]["calls"]) == 1000  # one script run each
    assert sync_redis.llen(keys.rq_queue) == 1000

    code, out = cli("dlq", "requeue", "--all")  # the 2,000 left of merchant's; erp's 300 stay
    assert (code, out) == (0, "2000 update(s) requeued\n")
    assert sync_redis.hlen(keys.dead_letters) == 300 and sync_redis.llen(keys.rq_queue) == 3000
    assert cli("dlq", "requeue", "--all", "--destination", "erp") == (
        1,
        "0 update(s) requeued matching destination=erp\n",
    )
    assert sync_redis.hlen(keys.dead_letters) == 300

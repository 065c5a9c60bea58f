"""The dead-letter queue as ops use it: `intergiro-receiver dlq ...` against real workers and a sink."""

from __future__ import annotations

import json
from typing import Any

import pytest

from receiver.rediskeys import RedisKeys
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
    assert cli("dlq", "requeue", "--all") == (0, f"requeued {first}\n1 update(s) requeued\n")
    await wait_for(lambda: len(sink.attempts(first)) == 2, what="the requeued update")
    assert [r.update["event"]["sequence"] for r in sink.received] == [0, 1, 0]

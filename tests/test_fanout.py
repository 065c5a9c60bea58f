"""Fan-out: several destinations, each with its own filter, order, retries and dead letters. Real Redis,
real worker processes (`intergiro-receiver worker`), real HTTP sinks."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import orjson
import pytest
from standardwebhooks.webhooks import Webhook, WebhookVerificationError

from receiver.app import CALLBACK_PATH
from receiver.chains import OrderChains
from receiver.destinations import Destination
from receiver.history import DESTINATION_REMOVED_REASON as REMOVED
from receiver.history import render
from receiver.rediskeys import RedisKeys
from receiver.settings import Settings
from receiver.trace import trace
from tests.conftest import DAYS
from tests.helpers import JWT, card_order, token
from tests.merchant_handlers import BOOKS
from tests.sink import SECRET, Sink, wait_for
from tests.test_reconcile import WINDOW, reconcile
from workers.runner import retire_removed_destinations

ERP_SECRET = "whsec_" + "RVJQLXNlY3JldC1mb3ItdGhlLWVycC1kZXN0aW5hdGlvbg=="
EVENTS = ("order", "charge", "refund")  # statuses: ordered, charged, refunded


def destinations_env(erp: Sink, warehouse: Sink | None = None, **more: Any) -> dict[str, str]:
    """erp and warehouse: webhooks with their own secrets (and, by `more`, filters)."""
    env = {"DESTINATIONS": "erp", "DESTINATION_ERP_URL": erp.url, "DESTINATION_ERP_SECRET": ERP_SECRET}
    if warehouse is not None:
        env["DESTINATIONS"] += ",warehouse"
        env |= {"DESTINATION_WAREHOUSE_URL": warehouse.url, "DESTINATION_WAREHOUSE_SECRET": SECRET}
    return env | {k: str(v) for k, v in more.items()}


async def receiver_for(make_receiver: Any, env: dict[str, str]) -> Any:
    """A receiver configured like the workers (the destinations and their filters from `env`)."""
    return await make_receiver(extra_destinations=Settings.from_env(env, dotenv=False).extra_destinations)


async def post_rounds(receiver: Any, key: Any, orders: list[str], rounds: int = 3) -> None:
    """Every order's callback grows by one event per round, as Intergiro sends them."""
    for round_ in range(1, rounds + 1):
        for order_id in orders:
            answer = await receiver.post(
                CALLBACK_PATH, data=token(card_order(order_id, EVENTS[:round_]), key), headers=JWT
            )
            assert answer.status == 200, await answer.text()


def sequences(received: list[dict[str, Any]]) -> dict[str, list[int]]:
    by_order: dict[str, list[int]] = {}
    for update in received:
        by_order.setdefault(update["order_id"], []).append(update["event"]["sequence"])
    return by_order


async def test_two_webhooks_and_a_handler_get_exactly_their_filters_updates_once_in_sequence_each_signed_with_its_own_secret(
    make_receiver: Any, make_sink: Any, rsa_key: Any, workers: Any, sync_redis: Any, settings: Settings
) -> None:
    erp, warehouse = await make_sink(), await make_sink()
    env = destinations_env(
        erp, warehouse, DESTINATION_ERP_EVENTS="charge,refund", DESTINATION_WAREHOUSE_STATUSES="charged",
        DESTINATIONS="erp,warehouse,books", DESTINATION_BOOKS_HANDLER="tests.merchant_handlers:books",
        DESTINATION_BOOKS_EVENTS="order,charge",
    )  # fmt: skip
    receiver = await receiver_for(make_receiver, env)
    orders = [f"FanOut{n:010d}" for n in range(20)]
    await post_rounds(receiver, rsa_key, orders)
    workers(**env)
    await wait_for(lambda: len(erp.received) >= 40 and len(warehouse.received) >= 20 and sync_redis.llen(BOOKS) >= 40,
                   seconds=90, what="every destination's share")  # fmt: skip
    await asyncio.sleep(1)  # nothing more comes
    books = [orjson.loads(raw) for raw in sync_redis.lrange(BOOKS, 0, -1)]
    assert sequences([r.update for r in erp.received]) == {o: [1, 2] for o in orders}
    assert sequences([r.update for r in warehouse.received]) == {o: [1] for o in orders}
    assert sequences(books) == {o: [0, 1] for o in orders}
    for sink, own, other in ((erp, ERP_SECRET, SECRET), (warehouse, SECRET, ERP_SECRET)):
        ids = [r.headers["webhook-id"] for r in sink.received]
        assert len(ids) == len(set(ids))
        for received in sink.received:
            assert (
                Webhook(own).verify(received.body, received.headers)["id"] == received.headers["webhook-id"]
            )
            with pytest.raises(WebhookVerificationError):
                Webhook(other).verify(received.body, received.headers)
    # the history tells each destination's attempts apart
    [story] = trace(sync_redis, RedisKeys(), orders[0])
    charge = next(u for u in story["updates"] if u["event"]["type"] == "charge")
    assert sorted(a["target"] for a in charge["attempts"]) == [
        "books:handler",
        "erp:webhook",
        "warehouse:webhook",
    ]
    assert charge["destinations"] == {"books": "delivered", "erp": "delivered", "warehouse": "delivered"}
    assert (
        "charge -> charged: delivered; books: delivered after 1 attempt(s); erp: delivered after 1 attempt(s); "
        "warehouse: delivered after 1 attempt(s)" in "\n".join(render(story))  # each destination's own count
    )
    metrics = await (await receiver.get("/metrics")).text()
    assert 'intergiro_deliveries_total{destination="erp",outcome="delivered"} 40.0' in metrics
    assert 'intergiro_deliveries_total{destination="warehouse",outcome="delivered"} 20.0' in metrics


async def test_a_destination_answering_503_delays_no_other_and_then_gets_its_share_in_order(
    make_receiver: Any, make_sink: Any, rsa_key: Any, workers: Any
) -> None:
    erp, warehouse = await make_sink(), await make_sink()
    down = [True]  # erp answers 503 until the test brings it back: no clock decides
    erp.answer = lambda _id, _n: (503, {}, 0.0) if down[0] else (200, {}, 0.0)
    env = destinations_env(
        erp, warehouse, DESTINATION_ERP_BACKOFF_SECONDS=0.1, DESTINATION_ERP_MAX_ATTEMPTS=50
    )
    receiver = await receiver_for(make_receiver, env)
    orders = [f"Outage{n:010d}" for n in range(20)]
    await post_rounds(receiver, rsa_key, orders)
    workers(**env)
    await wait_for(lambda: len(warehouse.received) >= 60, seconds=60, what="warehouse's 60 updates")
    assert erp.received and all(r.update["event"]["sequence"] == 0 for r in erp.received)  # erp: heads only
    down_until = time.time()
    down[0] = False
    await wait_for(lambda: len({r.headers["webhook-id"] for r in erp.received if r.at >= down_until}) >= 60,
                   seconds=90, what="erp's 60 updates after it recovered")  # fmt: skip
    delivered = [r.update for r in erp.received if r.at >= down_until]
    assert sequences(delivered) == {o: [0, 1, 2] for o in orders}
    assert sequences([r.update for r in warehouse.received]) == {o: [0, 1, 2] for o in orders}


async def test_a_400_from_one_destination_dead_letters_only_its_copy(
    make_receiver: Any, make_sink: Any, rsa_key: Any, workers: Any, sync_redis: Any, cli: Any,
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    erp, warehouse = await make_sink(), await make_sink()
    refused = "Refused000000001-1-charge"
    erp.answer = lambda update_id, _n: (400, {}, 0.0) if update_id == refused else (200, {}, 0.0)
    env = destinations_env(erp, warehouse)
    receiver = await receiver_for(make_receiver, env)
    await post_rounds(receiver, rsa_key, ["Refused000000001"])
    workers(**env)
    await wait_for(lambda: len(warehouse.received) == 3 and len(erp.received) == 3, what="every attempt")
    await wait_for(lambda: sync_redis.hlen(RedisKeys().dead_letters) == 1, what="the dead letter")
    [entry] = [orjson.loads(raw) for raw in sync_redis.hvals(RedisKeys().dead_letters)]
    assert (entry["id"], entry["destination"], entry["update"]["id"]) == (f"{refused}__erp", "erp", refused)
    assert entry["last_error"] == "merchant answered HTTP 400"
    assert [r.headers["webhook-id"] for r in warehouse.received] == [
        "Refused000000001-0-order", refused, "Refused000000001-2-refund"
    ]  # fmt: skip
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    code, out = cli("dlq", "list", "--destination", "warehouse")
    assert (code, out.strip()) == (0, "0 dead-lettered update(s)")
    code, out = cli("dlq", "list", "--destination", "erp")
    assert code == 0 and f"{refused}__erp  destination=erp" in out
    erp.answer = lambda _id, _n: (200, {}, 0.0)
    code, out = cli("dlq", "requeue", "--all", "--destination", "erp")
    assert code == 0, out
    await wait_for(lambda: len(erp.received) == 4, what="erp's requeued delivery")
    assert erp.received[-1].headers["webhook-id"] == refused
    assert len(warehouse.received) == 3
    metrics = await (await receiver.get("/metrics")).text()
    assert 'intergiro_deliveries_total{destination="erp",outcome="dead_lettered"} 1.0' in metrics


async def test_a_worker_with_destination_erp_delivers_only_erps(
    make_receiver: Any, make_sink: Any, rsa_key: Any, workers: Any, sync_redis: Any
) -> None:
    erp, warehouse = await make_sink(), await make_sink()
    env = destinations_env(erp, warehouse)
    receiver = await receiver_for(make_receiver, env)
    await post_rounds(receiver, rsa_key, ["OnlyErp000000001", "OnlyErp000000002"])
    workers("--destination", "erp", **env)
    await wait_for(lambda: len(erp.received) == 6, what="erp's six updates")
    await asyncio.sleep(1)
    assert warehouse.received == []
    warehouse_keys = RedisKeys().for_destination("warehouse")
    assert sync_redis.llen(warehouse_keys.rq_queue) == 2  # each order's head, waiting for warehouse's workers
    assert sync_redis.scard(warehouse_keys.active_orders) == 2


async def test_a_destination_added_later_gets_updates_from_then_on_and_one_removed_is_dead_lettered(
    make_receiver: Any, make_sink: Any, rsa_key: Any, workers: Any, sync_redis: Any, make_settings: Any
) -> None:
    erp, warehouse = await make_sink(), await make_sink()
    order = card_order("Changing00000001", EVENTS[:1])
    only_erp = destinations_env(erp)
    before = await receiver_for(make_receiver, only_erp)
    assert (await before.post(CALLBACK_PATH, data=token(order, rsa_key), headers=JWT)).status == 200
    both = destinations_env(erp, warehouse)
    after = await receiver_for(make_receiver, both)
    order = card_order("Changing00000001", EVENTS[:2])
    assert (await after.post(CALLBACK_PATH, data=token(order, rsa_key), headers=JWT)).status == 200
    # warehouse, added later, has only the update queued since; the workers knew erp and warehouse
    retire_removed_destinations(
        Settings.from_env({**both, "REDIS_URL": make_settings().redis_url}, dotenv=False)
    )
    assert sync_redis.llen(RedisKeys().for_destination("warehouse").rq_queue) == 1
    workers(**only_erp)  # warehouse removed from the configuration
    await wait_for(lambda: len(erp.received) == 2, what="erp's two updates")
    await wait_for(lambda: sync_redis.hlen(RedisKeys().dead_letters) == 1, what="warehouse's dead letter")
    [entry] = [orjson.loads(raw) for raw in sync_redis.hvals(RedisKeys().dead_letters)]
    assert (entry["id"], entry["destination"], entry["last_error"]) == (
        "Changing00000001-1-charge__warehouse", "warehouse", REMOVED
    )  # fmt: skip
    assert warehouse.received == []
    keys = RedisKeys().for_destination("warehouse")
    assert not sync_redis.exists(keys.rq_queue, keys.active_orders, keys.order_head("Changing00000001"))
    assert OrderChains(sync_redis, keys).drop_all() == 0


async def test_reconcile_queues_each_missed_event_for_every_destination_its_filters_match(
    order_api: Any, api_settings: Settings, sync_redis: Any
) -> None:
    order_api.state["orders"] = [
        card_order("Reconciled000001", EVENTS[:2], created=f"{DAYS[0].isoformat()}T10:00:00.000Z")
    ]
    erp = Destination("erp", handler="tests.merchant_handlers:books", events=frozenset({"charge"}))
    settings = api_settings.with_changes(
        merchant_handler="tests.merchant_handlers:takes", extra_destinations=(erp,)
    )
    assert await reconcile(settings, *WINDOW, "--json") == 0
    jobs = sorted(k.decode().removeprefix("rq:job:") for k in sync_redis.scan_iter("rq:job:*"))
    assert jobs == ["Reconciled000001-0-order", "Reconciled000001-1-charge", "Reconciled000001-1-charge__erp"]
    erp_keys = RedisKeys().for_destination("erp")
    assert sync_redis.lrange(erp_keys.rq_queue, 0, -1) == [b"Reconciled000001-1-charge__erp"]
    assert sync_redis.lrange(RedisKeys().rq_queue, 0, -1) == [b"Reconciled000001-0-order"]

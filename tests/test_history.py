"""What happened to order X: every callback and delivery attempt kept, and `intergiro-receiver trace` to
read it. Real Redis, a real receiver, real worker processes and a real HTTP sink."""

from __future__ import annotations

import asyncio
import base64
import json
from collections.abc import Callable
from typing import Any

import pytest

from receiver.history import render
from receiver.rediskeys import RedisKeys
from tests.helpers import JWT, card_order, token
from tests.sink import Sink, log_events, wait_for
from tests.test_reconcile import WINDOW, reconcile
from tests.test_workers import post_dead_lettered, webhook_settings

PATH = "/callbacks/intergiro"


def trace(cli: Callable[..., Any], key: str) -> dict[str, Any]:
    code, out = cli("trace", key, "--json")
    assert code == 0, out
    document: dict[str, Any] = json.loads(out)
    return document


def update_of(document: dict[str, Any], update_id: str) -> dict[str, Any]:
    [update] = [u for u in document["updates"] if u["id"] == update_id]
    return update


def steps(update: dict[str, Any]) -> list[tuple[Any, ...]]:
    return [(a["outcome"], a["http_status"], a["target"]) for a in update["attempts"]]


async def test_a_charge_answered_503_then_200_shows_both_attempts_and_ends_delivered(
    receiver: Any, rsa_key: Any, sink: Sink, workers: Any, cli: Any, tmp_path: Any
) -> None:
    sink.answer = lambda _id, n: (503, {}, 0.0) if n == 1 and _id.endswith("charge") else (200, {}, 0.0)
    workers(**webhook_settings(sink, delivery_backoff_seconds=0.01))
    answer = await receiver.post(
        PATH,
        data=token(card_order("StoryOrder000001", ("order", "charge"), number="shop-1001"), rsa_key),
        headers={**JWT, "X-Request-ID": "req-abc-123"},
    )
    assert answer.status == 200
    charge = "StoryOrder000001-1-charge"
    await wait_for(lambda: len(sink.attempts(charge)) == 2, what="the charge's second attempt")
    await wait_for(lambda: update_of(trace(cli, "StoryOrder000001"), charge)["state"] == "delivered")

    document = trace(cli, "StoryOrder000001")
    assert document["order_id"] == "StoryOrder000001" and document["order_number"] == "shop-1001"
    [callback] = document["callbacks"]
    assert callback["outcome"] == "accepted" and callback["request_id"] == "req-abc-123"
    assert callback["queued"] == ["StoryOrder000001-0-order", charge]
    assert callback["verified_by"].startswith("local:")
    update = update_of(document, charge)
    assert update["event"] == {"type": "charge", "sequence": 1} and update["status"] == "charged"
    assert update["queued_by"] == "callback" and update["queued_at"] == callback["received_at"]
    assert steps(update) == [("retry", 503, "webhook"), ("delivered", 200, "webhook")]
    assert all(a["duration_ms"] >= 0 and a["at"] for a in update["attempts"])
    assert "Service Unavailable" in update["attempts"][0]["error"] or "503" in update["attempts"][0]["error"]
    assert update_of(document, "StoryOrder000001-0-order")["state"] == "delivered"

    # the same story by merchant order number and by update id; and for a person
    assert trace(cli, "shop-1001") == document
    assert trace(cli, charge) == document
    code, out = cli("trace", "shop-1001")
    assert code == 0 and "retry (HTTP 503)" in out and "delivered (HTTP 200)" in out and "req-abc-123" in out
    # the worker logged the delivery at INFO, naming its process
    [line] = [r for r in log_events(tmp_path / "worker.log", "update delivered") if r["update"] == charge]
    assert (line["order"], line["http_status"], line["target"], line["attempt"]) == (
        "StoryOrder000001", 200, "webhook", 2,
    )  # fmt: skip
    assert line["pid"] > 0 and line["duration_ms"] >= 0


async def test_a_400_shows_dead_lettered_and_after_requeue_and_a_200_all_three_steps(
    receiver: Any, rsa_key: Any, sink: Sink, workers: Any, cli: Any, sync_redis: Any
) -> None:
    refused = {"yes"}
    sink.answer = lambda _id, _n: (400, {}, 0.0) if refused else (200, {}, 0.0)
    workers(**webhook_settings(sink))
    update_id = await post_dead_lettered(receiver, rsa_key, sync_redis, "RefusedStory0001")
    update = update_of(trace(cli, update_id), update_id)
    assert update["state"] == "dead_lettered"
    assert steps(update) == [("dead_lettered", 400, "webhook")]

    refused.clear()
    assert cli("dlq", "requeue", update_id)[0] == 0
    await wait_for(lambda: update_of(trace(cli, update_id), update_id)["state"] == "delivered")
    update = update_of(trace(cli, update_id), update_id)
    assert steps(update) == [("dead_lettered", 400, "webhook"), ("delivered", 200, "webhook")]
    assert update["queued_by"] == "requeue"
    assert "queued by requeue" in cli("trace", update_id)[1]


async def test_an_event_found_by_reconcile_shows_queued_by_reconcile_and_a_replay_shows_duplicate(
    receiver: Any,
    rsa_key: Any,
    order_api: Any,
    api_settings: Any,
    cli: Any,
) -> None:
    order = card_order("Order0001", ("order", "charge"), created="2024-05-01T10:00:00.000Z")
    first = card_order("Order0001", ("order",), created="2024-05-01T10:00:00.000Z")
    body = token(first, rsa_key)
    assert (await receiver.post(PATH, data=body, headers=JWT)).status == 200
    order_api.state["orders"] = [order]
    assert await reconcile(api_settings, *WINDOW) == 0
    assert (await (await receiver.post(PATH, data=body, headers=JWT)).json())["status"] == "duplicate"
    replay_of_both = token(order, rsa_key)  # two events, both seen: refused by the intake script itself
    assert (await (await receiver.post(PATH, data=replay_of_both, headers=JWT)).json())[
        "status"
    ] == "duplicate"

    document = trace(cli, "Order0001")
    assert [c["outcome"] for c in document["callbacks"]] == ["accepted", "duplicate", "duplicate"]
    assert document["callbacks"][1]["queued"] == []
    charge = update_of(document, "Order0001-1-charge")
    assert charge["queued_by"] == "reconcile" and charge["state"] == "waiting"  # behind the order update
    assert update_of(document, "Order0001-0-order")["queued_by"] == "callback"


def scripts_run(client: Any) -> int:
    stats = client.info("commandstats")
    return sum(int(stats.get(f"cmdstat_{name}", {}).get("calls", 0)) for name in ("evalsha", "eval"))


async def test_a_replay_is_kept_alike_whether_the_replay_guard_or_the_intake_script_refused_it(
    receiver: Any, rsa_key: Any, sync_redis: Any
) -> None:
    light = card_order("LightReplay00001", ("order", "charge"), number="shop-light")
    heavy = card_order("HeavyReplay00001", ("order", "charge", *["refund"] * 38), number="shop-heavy",
                       items=100_000)  # fmt: skip
    entries = {}
    for order in (light, heavy):
        body = token(order, rsa_key)
        assert (await (await receiver.post(PATH, data=body, headers=JWT)).json())["status"] == "accepted"
        scripts = scripts_run(sync_redis)
        answer = await receiver.post(PATH, data=body, headers=JWT)
        assert (await answer.json()) == {"status": "duplicate", "order": order["id"]}
        ran = scripts_run(sync_redis) - scripts
        assert ran == (1 if order is light else 0)  # the heavy replay: one read, no job data built or sent
        first, replay = (json.loads(e) for e in sync_redis.lrange(RedisKeys().history(order["id"]), 0, -1))
        assert (first["outcome"], replay["outcome"], replay["queued"]) == ("accepted", "duplicate", [])
        entries[order is light] = {
            k: v for k, v in replay.items() if k not in ("at", "order_number", "request_id")
        }
    assert entries[True] == entries[False]


async def test_after_the_retention_nothing_of_the_history_is_left_and_trace_exits_1_while_dedup_stands(
    make_receiver: Any, rsa_key: Any, cli: Any, sync_redis: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    receiver = await make_receiver(history_retention_seconds=1)
    order = card_order("ShortLived000001", number="shop-short")
    assert (await receiver.post(PATH, data=token(order, rsa_key), headers=JWT)).status == 200
    assert trace(cli, "shop-short")["order_id"] == "ShortLived000001"
    keys = RedisKeys()
    assert sync_redis.ttl(keys.history("ShortLived000001")) == 1
    await asyncio.sleep(2.1)
    assert not sync_redis.exists(keys.history("ShortLived000001"), keys.history_number("shop-short"))
    assert cli("trace", "ShortLived000001")[0] == 1
    assert cli("trace", "shop-short")[0] == 1
    assert sync_redis.hexists(keys.seen("ShortLived000001"), "0:order")
    answer = await receiver.post(PATH, data=token(order, rsa_key), headers=JWT)
    assert (await answer.json())["status"] == "duplicate"


async def test_with_history_off_nothing_is_written_and_trace_says_so(
    make_receiver: Any, rsa_key: Any, cli: Any, sync_redis: Any
) -> None:
    receiver = await make_receiver(history_retention_seconds=0)
    assert (
        await receiver.post(PATH, data=token(card_order("NoHistory0000001"), rsa_key), headers=JWT)
    ).status == 200
    assert list(sync_redis.scan_iter("igr:history*")) == []
    code, _ = cli("trace", "NoHistory0000001")
    assert code == 1


async def test_several_orders_sharing_a_merchant_number_are_all_shown_newest_first(
    receiver: Any, rsa_key: Any, cli: Any
) -> None:
    for order_id in ("SharedNumber0001", "SharedNumber0002"):
        order = card_order(order_id, number="shop-shared")
        assert (await receiver.post(PATH, data=token(order, rsa_key), headers=JWT)).status == 200
        await asyncio.sleep(0.01)
    code, out = cli("trace", "shop-shared", "--json")
    assert code == 0
    assert [d["order_id"] for d in json.loads(out)] == ["SharedNumber0002", "SharedNumber0001"]


async def test_each_attempt_keeps_what_the_merchant_answered_cut_to_1_kib_without_our_credentials(
    receiver: Any, rsa_key: Any, sink: Sink, workers: Any, cli: Any, sync_redis: Any
) -> None:
    """Its status, Retry-After, Content-Type, duration and the start of its body (a merchant echoing
    our request's Authorization header gets it stored as ***)."""
    basic = base64.b64encode(b"shop:pw-in-the-url").decode()
    sink.answer_body = (f'{{"error": "unknown order", "you sent": "Basic {basic}", "pw": "pw-in-the-url", "pad": "'
                        + "x" * 2000 + '"}').encode()  # fmt: skip
    problem = {"Content-Type": "application/problem+json"}
    sink.answer = lambda _id, n: (
        (503, {**problem, "Retry-After": "1"}, 0.0) if n == 1 else (400, problem, 0.0)
    )
    url = sink.url.replace("http://", "http://shop:pw-in-the-url@")
    workers(**webhook_settings(sink, merchant_webhook_url=url, delivery_max_attempts=3))
    update_id = await post_dead_lettered(receiver, rsa_key, sync_redis, "AnsweredOrder001")
    first, last = update_of(trace(cli, update_id), update_id)["attempts"]
    assert (first["outcome"], first["http_status"], first["retry_after"], first["content_type"]) == (
        "retry", 503, "1", "application/problem+json"
    )  # fmt: skip
    assert (last["outcome"], last["http_status"], last["retry_after"]) == ("dead_lettered", 400, None)
    for attempt in (first, last):
        assert attempt["body"].startswith('{"error": "unknown order", "you sent": "Basic ***", "pw": "***"')
        assert len(attempt["body"].encode()) == 1024 and attempt["duration_ms"] >= 0  # cut after ***
    assert "pw-in-the-url" not in json.dumps(
        sync_redis.lrange(RedisKeys().history("AnsweredOrder001"), 0, -1), default=str
    )
    story = cli("trace", update_id)[1]
    assert "dead_lettered (HTTP 400)" in story and "retry (HTTP 503, Retry-After 1)" in story
    assert story.count("answer (application/problem+json):") == 2
    assert '| {"error": "unknown order"' in story


async def test_an_order_only_reconcile_queued_shows_its_merchant_number(
    order_api: Any, api_settings: Any, cli: Any
) -> None:
    order_api.state["orders"] = [card_order("OnlyReconciled01", created="2024-05-01T10:00:00.000Z")]
    assert await reconcile(api_settings, *WINDOW) == 0
    assert trace(cli, "n-OnlyReconciled01")["order_number"] == "n-OnlyReconciled01"
    assert (
        "order OnlyReconciled01 (merchant number n-OnlyReconciled01)" in cli("trace", "OnlyReconciled01")[1]
    )


async def test_a_dead_letter_requeued_and_dead_lettered_again_counts_every_attempt_as_trace_does(
    receiver: Any, rsa_key: Any, sink: Sink, workers: Any, cli: Any, sync_redis: Any
) -> None:
    sink.answer = lambda _id, _n: (400, {}, 0.0)
    workers(**webhook_settings(sink))
    update_id = await post_dead_lettered(receiver, rsa_key, sync_redis, "TwiceRefused0001")
    assert cli("dlq", "requeue", update_id)[0] == 0
    await wait_for(lambda: len(sink.attempts(update_id)) == 2 and sync_redis.hexists(RedisKeys().dead_letters, update_id),
                   what="the second dead letter")  # fmt: skip
    entry = json.loads(sync_redis.hget(RedisKeys().dead_letters, update_id))
    assert entry["attempts"] == len(update_of(trace(cli, update_id), update_id)["attempts"]) == 2


def test_the_summary_counts_each_destinations_attempts_apart() -> None:
    attempt = {
        "at": "2026-01-01T00:00:00Z",
        "outcome": "delivered",
        "http_status": 200,
        "error": None,
        "duration_ms": 1.0,
    }
    document = {
        "order_id": "O1", "order_number": None, "callbacks": [],
        "updates": [{
            "id": "O1-0-order", "event": {"type": "order", "sequence": 0}, "status": "ordered", "state": "delivered",
            "queued_at": None, "queued_by": "callback", "destinations": {"erp": "delivered"},
            "attempts": [{**attempt, "target": "webhook"}, *[{**attempt, "target": "erp:webhook"}] * 2],
        }],
    }  # fmt: skip
    assert render(document)[-1].endswith(
        "order -> ordered: delivered after 1 attempt(s); erp: delivered after 2 attempt(s)"
    )

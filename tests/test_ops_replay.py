"""Replay from the ops console: the JSON API's dry run and replay, and an operator in a real browser who
counts a window, confirms it and sees it delivered again to that destination only, marked as replays.
Real Redis, a real receiver, real worker processes, real sinks, the fake Intergiro order list
(tests/conftest.py `order_api`), the console as its own process for the browser."""

from __future__ import annotations

import asyncio
import json
import os
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webdriver import WebDriver

from receiver.app import CALLBACK_PATH
from receiver.ops.app import create_ops_app
from receiver.rediskeys import RedisKeys
from receiver.replay import last_replay
from receiver.settings import Settings
from tests.helpers import JWT, token
from tests.processes import ROOT, free_port, start_server, stop
from tests.sink import SECRET, Sink, wait_for
from tests.test_fanout import ERP_SECRET
from tests.test_ops_api import BEARER, TOKEN, sign_in
from tests.test_ops_browser import browser, follow, shot, step, texts, until  # noqa: F401 (a fixture)
from tests.test_replay import today_order

ORDERS = [f"OpsReplay{n:07d}" for n in range(3)]  # three events each: nine updates a destination
ERP = RedisKeys().for_destination("erp")


def two_destinations(merchant: Sink, erp: Sink, order_api: Any) -> dict[str, str]:
    """The deployment's environment: `merchant` and `erp` webhooks, Intergiro's (fake) order list."""
    return {
        "MERCHANT_WEBHOOK_URL": merchant.url, "MERCHANT_WEBHOOK_SECRET": SECRET, "DESTINATIONS": "erp",
        "DESTINATION_ERP_URL": erp.url, "DESTINATION_ERP_SECRET": ERP_SECRET,
        "INTERGIRO_API_URL": str(order_api.make_url("")).rstrip("/"), "INTERGIRO_API_KEY": "test-api-key",
    }  # fmt: skip


async def delivered_once(
    env: dict[str, str], make_settings: Any, make_receiver: Any, rsa_key: Any, workers: Any, order_api: Any,
    merchant: Sink, erp: Sink, sync_redis: Any,
) -> Settings:  # fmt: skip
    """ORDERS received, listed by Intergiro and delivered to both destinations; the settings."""
    parsed = Settings.from_env(env, dotenv=False)
    settings: Settings = make_settings(
        extra_destinations=parsed.extra_destinations, merchant_webhook_url=merchant.url,
        merchant_webhook_secret=SECRET, intergiro_api_url=parsed.intergiro_api_url,
        intergiro_api_key=parsed.intergiro_api_key, ops_token=TOKEN,
    )  # fmt: skip
    receiver = await make_receiver(**{f: getattr(settings, f) for f in ("extra_destinations",
                                   "merchant_webhook_url", "merchant_webhook_secret")})  # fmt: skip
    for order_id in ORDERS:
        order = today_order(order_id)
        order_api.state["orders"].append(order)
        assert (await receiver.post(CALLBACK_PATH, data=token(order, rsa_key), headers=JWT)).status == 200
    workers(**{k.lower(): v for k, v in env.items()})
    await wait_for(lambda: len(merchant.received) == 9 and len(erp.received) == 9, what="first deliveries")
    await wait_for(lambda: not sync_redis.hlen(RedisKeys().pending_updates), what="every update finished")
    return settings


async def test_the_api_counts_a_replay_then_queues_the_window_for_that_destination_only(
    aiohttp_client: Any, make_settings: Any, make_receiver: Any, make_sink: Any, rsa_key: Any, workers: Any,
    sync_redis: Any, order_api: Any,
) -> None:  # fmt: skip
    merchant, erp = await make_sink(), await make_sink()
    env = two_destinations(merchant, erp, order_api)
    settings = await delivered_once(
        env, make_settings, make_receiver, rsa_key, workers, order_api, merchant, erp, sync_redis
    )
    ops = await aiohttp_client(create_ops_app(settings, redis=sync_redis))
    path = "/api/destinations/erp/replay"

    async def post(body: Any, to: str = path, headers: dict[str, str] = BEARER) -> tuple[int, Any]:
        answer = await ops.post(to, headers=headers, data=json.dumps(body))
        return answer.status, await answer.json()

    status, body = await post({"since": "1d"}, to="/api/destinations/warehouse/replay")
    assert (status, body["error"]) == (404, "not_found")
    status, body = await post({"since": "30d"})
    assert (status, body["error"]) == (400, "bad_window") and "REPLAY_MAX_WINDOW_SECONDS" in body["reason"]
    status, body = await post({"start": "2020-01-01", "end": "2020-03-01"})
    assert (status, body["error"]) == (400, "bad_window")
    assert (await post({"since": 3600}))[0] == 400 and (await post({"since": "1d", "dry": True}))[0] == 400
    assert not order_api.state["requests"]  # refused before reading anything

    csrf = await sign_in(ops)  # a session, and a POST without its CSRF token
    answer = await ops.post(path, data=json.dumps({"since": "1d"}))
    assert answer.status == 403
    assert (await ops.get(path)).status == 404  # no replay recorded
    assert (await post({"since": "1d"}, headers={"X-CSRF-Token": "wrong"}))[0] == 403

    status, body = await post({"since": "1d", "dry_run": True}, headers={"X-CSRF-Token": csrf})
    assert status == 200, body
    assert (body["would_queue"], body["orders_would_queue"], body["skipped_pending"]) == (9, 3, 0)
    assert body["dry_run"] is True and body["orders_listed"] == 3
    status, body = await post({"since": "1d", "order": ORDERS[1], "dry_run": True})
    assert (status, body["would_queue"], body["orders_would_queue"]) == (200, 3, 1)
    await asyncio.sleep(1)
    assert len(erp.received) == 9 and len(merchant.received) == 9  # the dry runs changed nothing
    assert not sync_redis.hlen(RedisKeys().pending_updates) and not sync_redis.exists(ERP.replay_last)

    order_api.state["gate"] = gate = asyncio.Event()  # the order list answers once the test says so
    status, body = await post({"since": "1d"})
    assert (status, body["state"], body["by"]) == (202, "running", "ops:bearer")
    status, body = await post({"since": "1d"})  # one replay per destination at a time
    assert (status, body["error"]) == (409, "replay_running") and "running already" in body["reason"]
    assert (await (await ops.get(path, headers=BEARER)).json())["state"] == "running"
    gate.set()

    async def ended() -> Any:
        return await (await ops.get(path, headers=BEARER)).json()

    deadline = time.monotonic() + 30
    while (last := await ended())["state"] == "running":
        assert time.monotonic() < deadline, "the replay did not end"
        await asyncio.sleep(0.2)
    assert (last["state"], last["queued"], last["orders_queued"], last["by"]) == (
        "completed",
        9,
        3,
        "ops:bearer",
    )
    await wait_for(lambda: len(erp.received) == 18, what="the replayed deliveries")
    replayed = erp.received[9:]
    assert all(r.headers.get("webhook-replay") == "1" for r in replayed)
    by_order: dict[str, list[int]] = {}
    for received in replayed:
        by_order.setdefault(received.update["order_id"], []).append(received.update["event"]["sequence"])
    assert by_order == {o: [0, 1, 2] for o in ORDERS}  # each order in its sequence
    await wait_for(lambda: not sync_redis.hlen(RedisKeys().pending_updates), what="the replay delivered")
    assert len(merchant.received) == 9  # the other destination untouched
    assert not sync_redis.exists(ERP.replay_lock)  # freed: the next replay may run
    status, body = await post({"since": "1d", "order": ORDERS[0]})
    assert status == 202


async def test_a_console_stopping_mid_replay_stops_it_records_it_failed_and_frees_the_destination(
    aiohttp_client: Any, make_settings: Any, make_receiver: Any, make_sink: Any, rsa_key: Any, workers: Any,
    sync_redis: Any, order_api: Any,
) -> None:  # fmt: skip
    merchant, erp = await make_sink(), await make_sink()
    env = two_destinations(merchant, erp, order_api)
    settings = await delivered_once(
        env, make_settings, make_receiver, rsa_key, workers, order_api, merchant, erp, sync_redis
    )
    ops = await aiohttp_client(create_ops_app(settings, redis=sync_redis))
    order_api.state.update(paging="link", page_size=1, gate=asyncio.Event())  # a page an order, held
    answer = await ops.post("/api/destinations/erp/replay", headers=BEARER, data=json.dumps({"since": "1d"}))
    assert answer.status == 202
    stopping = asyncio.create_task(ops.close())
    await asyncio.sleep(0.5)
    assert not stopping.done()  # the console waits for its replay to stop
    order_api.state["gate"].set()
    await asyncio.wait_for(stopping, 30)
    last = last_replay(sync_redis, settings, settings.extra_destinations[0])
    assert last is not None and (last["state"], last["queued"]) == ("failed", 0)
    assert "stopping" in last["errors"][-1]
    assert not sync_redis.exists(ERP.replay_lock)  # the next replay may run
    await asyncio.sleep(1)
    assert len(erp.received) == 9 and not sync_redis.hlen(RedisKeys().pending_updates)  # nothing queued


@pytest.fixture
def replay_console(tmp_path: Path, redis_url: str) -> Iterator[Any]:
    """Starts `intergiro-receiver ops` with the given environment; (its URL, its log)."""
    started = []

    def start(env: dict[str, str]) -> tuple[str, Path]:
        port = free_port()
        base = {k: v for k, v in os.environ.items() if not k.startswith(("OPS_", "HTTP", "NO_PROXY"))}
        log = tmp_path / "ops.log"
        base.update(env, REDIS_URL=redis_url, OPS_TOKEN=TOKEN, OPS_PORT=str(port), LOG_FORMAT="json")
        started.append(start_server("ops", port=port, env=base, log=log))
        return f"http://127.0.0.1:{port}", log

    yield start
    for process in started:
        stop(process)


async def test_an_operator_counts_a_window_confirms_it_and_sees_it_replayed_to_that_destination_only(
    replay_console: Any, browser: WebDriver, make_settings: Any, make_receiver: Any, make_sink: Any,  # noqa: F811
    rsa_key: Any, workers: Any, sync_redis: Any, order_api: Any,
) -> None:  # fmt: skip
    merchant, erp = await make_sink(), await make_sink()
    env = two_destinations(merchant, erp, order_api)
    await delivered_once(
        env, make_settings, make_receiver, rsa_key, workers, order_api, merchant, erp, sync_redis
    )
    console, log = replay_console(env)

    def sign_in_and_count_the_window() -> None:
        browser.get(f"{console}/")
        browser.find_element(By.ID, "token").send_keys(TOKEN)
        follow(browser, browser.find_element(By.ID, "sign-in"))
        follow(browser, browser.find_element(By.CSS_SELECTOR, 'tr[data-name="erp"] a.replay-link'))
        assert browser.find_element(By.TAG_NAME, "h1").text == "Replay to erp"
        browser.find_element(By.NAME, "since").send_keys("30d")
        follow(browser, browser.find_element(By.ID, "replay-count"))
        assert "REPLAY_MAX_WINDOW_SECONDS" in browser.find_element(By.ID, "replay-problem").text  # bounded
        since = browser.find_element(By.NAME, "since")
        since.clear()
        since.send_keys("1d")
        follow(browser, browser.find_element(By.ID, "replay-count"))
        assert browser.find_element(By.TAG_NAME, "h1").text == "Replay 9 update(s) of 3 order(s) to erp?"
        assert (browser.find_element(By.ID, "would-queue").text, browser.find_element(By.ID, "left-alone").text) == (
            "9", "0",
        )  # fmt: skip
        shot(browser, "replay-confirm")

    await step(sign_in_and_count_the_window)
    await asyncio.sleep(1)
    assert len(erp.received) == 9 and not sync_redis.exists(ERP.replay_last)  # counting queued nothing

    def confirm_and_see_it_end() -> None:
        follow(browser, browser.find_element(By.ID, "confirm"))
        assert browser.current_url == f"{console}/destinations/erp/replay"
        until(browser, lambda: texts(browser, "#replay-state") == ["completed"], reload=True)
        assert "Queued 9 update(s) of 3 order(s)" in browser.find_element(By.ID, "replay-result").text
        assert "by ops:session" in browser.find_element(By.ID, "last-replay").text
        shot(browser, "replay")

    await step(confirm_and_see_it_end)
    await wait_for(lambda: len(erp.received) == 18, what="the replayed deliveries")
    assert all(r.headers.get("webhook-replay") == "1" for r in erp.received[9:])
    assert sorted(r.update["id"] for r in erp.received[9:]) == sorted(
        r.update["id"] for r in erp.received[:9]
    )
    await wait_for(lambda: not sync_redis.hlen(RedisKeys().pending_updates), what="the replay delivered")
    assert len(merchant.received) == 9  # the other destination untouched
    lines = [json.loads(line) for line in log.read_text().splitlines() if line.startswith("{")]
    started = [e for e in lines if e.get("event") == "ops: replay started"]
    ended = [e for e in lines if e.get("event") == "ops: replay ended"]
    assert [(e["destination"], e["via"]) for e in started] == [("erp", "session")]  # who and what
    assert [(e["queued"], e["orders"]) for e in ended] == [(9, 3)]  # and how many
    assert re.search(r'"event": ?"replay"', log.read_text())  # replay's own summary line


def test_the_docs_show_the_replay_pages_the_browser_test_photographs() -> None:
    console = (ROOT / "docs" / "ops-console.md").read_text()
    for page in ("replay-confirm", "replay"):
        assert f"(images/ops-{page}.png)" in console, page
        assert (ROOT / "docs" / "images" / f"ops-{page}.png").stat().st_size > 10_000, page

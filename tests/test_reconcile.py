"""`intergiro-receiver reconcile`: events whose callbacks never arrived are found through Intergiro's
order list and queued once, with the id a callback would have given them."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import sys
from collections.abc import Callable, Iterator
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import structlog
from aiohttp import web

from receiver.cli import build_parser
from receiver.connections import async_redis
from receiver.intergiro_api import MAX_ORDER_PAGE_BYTES, OrderApi, RetryPolicy
from receiver.logs import configure_logging
from receiver.metrics.shared import SHARED_METRICS
from receiver.order import update_id
from receiver.reconcile import BUSY, COMPLETED, NOT_DUE, PeriodicReconcile, reconcile_command
from receiver.rediskeys import RedisKeys
from receiver.settings import Settings
from tests.conftest import DAYS, queued_updates
from tests.helpers import JWT, assert_valid_update, card_order, token
from tests.processes import run_command

WINDOW = ["--start", "2024-05-01", "--end", "2024-05-03"]


@pytest.fixture(autouse=True)
def logs_to_stderr() -> Iterator[None]:
    """As the CLI does: logs on stderr, so stdout holds only the summary."""
    configure_logging("console", "INFO")
    yield
    structlog.reset_defaults()


NO_WAIT = RetryPolicy(backoff_seconds=0)


async def reconcile(settings: Settings, *argv: str, retry: RetryPolicy = NO_WAIT) -> int:
    return await reconcile_command(settings, build_parser().parse_args(["reconcile", *argv]), retry)


def summary_numbers(out: str) -> dict[str, int]:
    """The numbers of the text summary, by label."""
    rows = [line.strip().rsplit(None, 1) for line in out.splitlines() if line.startswith("  ")]
    return {label.strip(): int(value) for label, value in rows}


def job_ids(sync_redis: Any) -> list[str]:
    return sorted(k.decode().removeprefix("rq:job:") for k in sync_redis.scan_iter("rq:job:*"))


async def post_callback(receiver: Any, order: dict[str, Any], rsa_key: Any) -> dict[str, Any]:
    answer = await receiver.post("/callbacks/intergiro", data=token(order, rsa_key), headers=JWT)
    assert answer.status == 200, await answer.text()
    body: dict[str, Any] = await answer.json()
    return body


def shop_orders(days: tuple[date, ...] = DAYS) -> list[dict[str, Any]]:
    """50 orders over the days: 0-9 ordered then charged, 10-14 charged and refunded, the rest ordered."""
    orders = []
    for n in range(50):
        events = ("order", "charge") if n < 10 else ("order", "charge", "refund") if n < 15 else ("order",)
        created = f"{days[n % len(days)].isoformat()}T10:00:00.000Z"
        orders.append(card_order(f"Order{n:04d}", events, created=created))
    return orders


async def test_reconcile_queues_exactly_the_20_events_whose_callbacks_never_arrived_once_with_callback_ids(
    receiver: Any, rsa_key: Any, order_api: Any, api_settings: Settings, sync_redis: Any, capsys: Any
) -> None:
    orders = shop_orders()
    lost = await arrange_lost_callbacks(receiver, orders, rsa_key)
    order_api.state["orders"] = orders
    every_event = {update_id(o["id"], i, e["type"]) for o in orders for i, e in enumerate(o["event"])}
    assert len(lost) == 20 and set(job_ids(sync_redis)) == every_event - lost

    assert await reconcile(api_settings, *WINDOW, "--json") == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["outcome"] == "completed"
    assert summary["orders_listed"] == 50
    assert summary["events_queued"] == 20 and set(summary["missed"]) == lost
    assert summary["events_known"] == len(every_event) - 20
    assert summary["malformed_orders"] == 0 and summary["errors"] == []
    assert [r["start"] for r in order_api.state["requests"]] == [d.isoformat() for d in DAYS]
    assert job_ids(sync_redis) == sorted(every_event)  # each event exactly once
    by_id = {u["id"]: u for u in queued_updates(sync_redis, api_settings)}
    for missed in lost:
        assert_valid_update(by_id[missed])
        assert by_id[missed]["verified_by"] == "api"

    assert await reconcile(api_settings, *WINDOW, "--json") == 0
    again = json.loads(capsys.readouterr().out)
    assert (again["events_queued"], again["missed"], again["events_known"]) == (0, [], len(every_event))
    assert job_ids(sync_redis) == sorted(every_event)

    late = await post_callback(receiver, orders[0], rsa_key)
    assert late == {"status": "duplicate", "order": orders[0]["id"]}
    metrics = await (await receiver.get("/metrics")).text()
    assert "intergiro_reconcile_missed_events_total 20.0" in metrics
    assert "intergiro_reconcile_orders_scanned_total 100.0" in metrics
    assert 'intergiro_reconcile_runs_total{outcome="completed"} 2.0' in metrics


async def arrange_lost_callbacks(receiver: Any, orders: list[dict[str, Any]], rsa_key: Any) -> set[str]:
    """Post the callbacks that arrived; returns the ids of the 20 events no callback brought.

    Orders 0-9 (order, charge): the `order` callback arrived, the `charge` one never did: 10 lost.
    Orders 10-14 (order, charge, refund): no callback at all: 15 lost... minus the 5 `order` events
    a first callback brought: 10 lost. Orders 15-49 (order): their callback arrived.
    """
    lost = set()
    for n, order in enumerate(orders):
        if n < 10:
            await post_callback(receiver, {**order, "event": order["event"][:1]}, rsa_key)
            lost.add(update_id(order["id"], 1, "charge"))
        elif n < 15:
            await post_callback(receiver, {**order, "event": order["event"][:1]}, rsa_key)
            lost |= {update_id(order["id"], 1, "charge"), update_id(order["id"], 2, "refund")}
        else:
            await post_callback(receiver, order, rsa_key)
    return lost


async def test_a_dry_run_lists_the_20_missed_events_and_queues_nothing(
    receiver: Any, rsa_key: Any, order_api: Any, api_settings: Settings, sync_redis: Any, capsys: Any
) -> None:
    orders = shop_orders()
    lost = await arrange_lost_callbacks(receiver, orders, rsa_key)
    order_api.state["orders"] = orders
    before = job_ids(sync_redis)
    metrics_before = sync_redis.hgetall(RedisKeys().metrics)

    assert await reconcile(api_settings, *WINDOW, "--dry-run") == 0
    out = capsys.readouterr().out
    assert {line.removeprefix("would queue ") for line in out.splitlines() if "would queue" in line} == lost
    assert summary_numbers(out)["events to queue (dry run)"] == 20
    assert job_ids(sync_redis) == before
    assert sync_redis.hgetall(RedisKeys().metrics) == metrics_before


async def test_two_periodic_reconcilers_started_at_once_queue_each_missed_event_once(
    receiver: Any,
    rsa_key: Any,
    order_api: Any,
    api_settings: Settings,
    sync_redis: Any,
) -> None:
    today = datetime.now(UTC).date()
    orders = shop_orders((today, today - timedelta(days=1)))
    lost = await arrange_lost_callbacks(receiver, orders, rsa_key)
    order_api.state["orders"] = orders
    order_api.state["gate"] = asyncio.Event()
    settings = api_settings.with_changes(reconcile_interval_seconds=3600)

    async with aiohttp.ClientSession() as one, aiohttp.ClientSession() as two:
        redis_one, redis_two = async_redis(settings), async_redis(settings)
        first = PeriodicReconcile(redis_one, settings, OrderApi(one, settings, NO_WAIT))
        second = PeriodicReconcile(redis_two, settings, OrderApi(two, settings, NO_WAIT))
        tasks = [asyncio.create_task(first.tick()), asyncio.create_task(second.tick())]
        # the lock holder waits at the API's gate; the other must give up without waiting for it
        done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        assert [t.result() for t in done] == [BUSY]
        order_api.state["gate"].set()
        assert sorted(await asyncio.gather(*tasks)) == sorted([BUSY, COMPLETED])
        # a restart right after: the stored watermark says the deployment is not due yet
        restarted = PeriodicReconcile(redis_one, settings, OrderApi(one, settings, NO_WAIT))
        requests = len(order_api.state["requests"])
        assert await restarted.tick() == NOT_DUE
        assert len(order_api.state["requests"]) == requests
        await redis_one.aclose()
        await redis_two.aclose()

    every_event = {update_id(o["id"], i, e["type"]) for o in orders for i, e in enumerate(o["event"])}
    assert job_ids(sync_redis) == sorted(every_event)
    runs = sync_redis.hgetall(RedisKeys().metrics)
    assert runs[b"intergiro_reconcile_missed_events_total"] == str(len(lost)).encode()
    assert runs[b"intergiro_reconcile_runs_total|outcome=completed"] == b"1"
    assert not sync_redis.exists(RedisKeys().reconcile_lock)
    assert float(sync_redis.get(RedisKeys().reconcile_watermark)) > datetime.now(UTC).timestamp() - 60


DIES_HOLDING_THE_LOCK = """
import asyncio, os, sys
from receiver.connections import async_redis
from receiver.reconcile import ReconcileLock
from receiver.rediskeys import RedisKeys
from receiver.settings import Settings

async def main():
    lock = ReconcileLock(async_redis(Settings.from_env({"REDIS_URL": sys.argv[1]}, dotenv=False)), RedisKeys(), 1500)
    assert await lock.acquire()
    os._exit(0)  # dies holding it: nothing releases it

asyncio.run(main())
"""


async def test_one_process_holds_the_reconcile_lock_renewed_while_it_runs_and_lapsing_when_it_dies(
    settings: Settings, sync_redis: Any
) -> None:
    from receiver.reconcile import ReconcileLock

    redis = async_redis(settings)
    keys = RedisKeys()
    try:
        first, second = ReconcileLock(redis, keys, ttl_ms=300), ReconcileLock(redis, keys, ttl_ms=300)
        assert await first.acquire() and not await second.acquire()
        await asyncio.sleep(1.0)  # more than three lifetimes: renewed all along
        assert not await second.acquire() and not first.lost
        assert await first.advance_watermark(100.0) and not await second.advance_watermark(200.0)
        assert sync_redis.get(keys.reconcile_watermark) == b"100.0"
        await first.release()
        assert not sync_redis.exists(keys.reconcile_lock)
        assert await second.acquire()
        sync_redis.delete(keys.reconcile_lock)  # taken from under it (an operator, a failover)
        await asyncio.sleep(0.3)
        assert second.lost and not await second.advance_watermark(300.0)
        await second.release()

        child = await asyncio.create_subprocess_exec(
            sys.executable,
            "-c",
            DIES_HOLDING_THE_LOCK,
            settings.redis_url,
            cwd=str(Path(__file__).parents[1]),
        )
        assert await child.wait() == 0
        third = ReconcileLock(redis, keys, ttl_ms=300)
        assert not await third.acquire()  # still the dead process's
        await asyncio.sleep(1.6)
        assert await third.acquire()  # lapsed with its expiry
        await third.release()
    finally:
        await redis.aclose()


async def test_an_api_answering_503_twice_then_200_is_waited_for_as_retry_after_says(
    order_api: Any, api_settings: Settings, sync_redis: Any, capsys: Any
) -> None:
    order_api.state["orders"] = shop_orders()[:3]
    order_api.state["failures"] = [503, 503]
    order_api.state["retry_after"] = "2"
    waited: list[float] = []

    async def sleep(seconds: float) -> None:
        waited.append(seconds)

    assert await reconcile(api_settings, *WINDOW, retry=RetryPolicy(sleep=sleep)) == 0
    assert waited == [2.0, 2.0]
    assert summary_numbers(capsys.readouterr().out)["events queued now"] == 6
    assert len(job_ids(sync_redis)) == 6


async def test_an_api_request_that_times_out_is_retried(
    order_api: Any, api_settings: Settings, sync_redis: Any
) -> None:
    order_api.state["orders"] = shop_orders()[:3]
    order_api.state["hang"] = 1
    impatient = api_settings.with_changes(intergiro_api_timeout_seconds=0.2)
    assert await reconcile(impatient, *WINDOW) == 0
    assert len(order_api.state["requests"]) == len(DAYS) + 1
    assert len(job_ids(sync_redis)) == 6


async def test_an_api_failing_on_every_try_ends_the_run_with_exit_1_and_a_rerun_completes_it(
    order_api: Any, api_settings: Settings, sync_redis: Any, capsys: Any
) -> None:
    order_api.state["orders"] = shop_orders()[:3]
    order_api.state["failures"] = [500, 502, 503, 504]
    assert await reconcile(api_settings, *WINDOW) == 1
    assert "failed after 4 attempts (answered 504)" in capsys.readouterr().err
    assert await reconcile(api_settings, *WINDOW) == 0
    assert len(job_ids(sync_redis)) == 6


async def test_an_api_refusing_the_key_stops_at_once_with_exit_1_and_queues_nothing(
    order_api: Any, api_settings: Settings, sync_redis: Any, capsys: Any
) -> None:
    order_api.state["orders"] = shop_orders()
    wrong_key = api_settings.with_changes(intergiro_api_key="revoked-key")
    assert await reconcile(wrong_key, *WINDOW) == 1
    err = capsys.readouterr().err
    assert "Intergiro refused INTERGIRO_API_KEY (401)" in err
    assert "revoked-key" not in err
    assert len(order_api.state["requests"]) == 1
    assert job_ids(sync_redis) == []


async def test_a_listed_order_with_wrong_types_is_counted_malformed_and_the_others_are_reconciled(
    order_api: Any, api_settings: Settings, sync_redis: Any, capsys: Any
) -> None:
    good = shop_orders()[:3]
    broken = card_order("Broken0001", created="2024-05-01T10:00:00.000Z", items="lots", currency=978)
    order_api.state["orders"] = [*good, broken, "not an order"]
    assert await reconcile(api_settings, *WINDOW, "--json") == 0
    captured = capsys.readouterr()
    summary = json.loads(captured.out)
    assert summary["malformed_orders"] == 2
    assert summary["malformed_order_ids"] == ["Broken0001", None]
    assert summary["orders_listed"] == 5 and summary["events_queued"] == 6
    assert not any(key.startswith(b"rq:job:Broken0001") for key in sync_redis.keys())
    assert broken["payment"]["card"] not in captured.err


def unwritable_orders(day: date) -> list[dict[str, Any]]:
    """Orders the API may list that no update carries as sent: a lone surrogate (a string cut inside an
    emoji), an integer beyond 64 bits (queued, repaired), and NaN, which is no JSON (skipped)."""
    created = f"{day.isoformat()}T11:00:00.000Z"
    return [
        card_order("Surrogate0000001", created=created, customer={"name": "Ann \ud83d"}),
        card_order("BigInteger000001", created=created, meta={"loyalty": 2**70}),
        card_order("NotFinite0000001", created=created, meta={"rate": float("nan")}),
        card_order("Surrogate0000002", created=created, number="n-\ud83d"),
    ]


@pytest.mark.parametrize("dry_run", [False, True], ids=["run", "dry-run"])
async def test_orders_with_lone_surrogates_or_huge_integers_are_queued_repaired_and_nan_is_skipped_by_id(
    order_api: Any, api_settings: Settings, sync_redis: Any, capsys: Any, dry_run: bool
) -> None:
    configure_logging("console", "INFO")  # onto the stderr capsys captures
    good = shop_orders()[:3]
    order_api.state["orders"] = [good[0], *unwritable_orders(DAYS[0]), *good[1:]]
    argv = [*WINDOW, "--json", *(["--dry-run"] if dry_run else [])]
    assert await reconcile(api_settings, *argv) == 0
    captured = capsys.readouterr()
    summary = json.loads(captured.out)
    assert summary["outcome"] == "completed"
    assert summary["orders_listed"] == 7
    assert summary["malformed_order_ids"] == ["NotFinite0000001"]
    assert summary["events_missed"] == 9  # the three good orders, two events each, and three repaired
    assert len(job_ids(sync_redis)) == (0 if dry_run else 9)
    assert "malformed order in the order list; skipped" in captured.err
    assert "NotFinite0000001" in captured.err and "not finite" in captured.err
    if dry_run:
        return
    updates = {u["order_id"]: u for u in queued_updates(sync_redis, api_settings)}
    assert updates["Surrogate0000001"]["customer"]["name"] == "Ann \ufffd"
    assert updates["Surrogate0000001"]["repaired"] == ["customer.name"]
    assert updates["BigInteger000001"]["meta"] == {"loyalty": str(2**70)}
    assert updates["BigInteger000001"]["repaired"] == ["meta.loyalty"]
    assert updates["Surrogate0000002"]["order_number"] == "n-\ufffd"
    for update in updates.values():
        assert_valid_update(update)


async def test_periodic_reconcile_moves_its_watermark_past_a_day_holding_an_unwritable_order(
    order_api: Any, api_settings: Settings, sync_redis: Any
) -> None:
    today = datetime.now(UTC).date()
    order_api.state["orders"] = [*shop_orders((today,))[:2], *unwritable_orders(today)]
    settings = api_settings.with_changes(reconcile_interval_seconds=3600)
    async with aiohttp.ClientSession() as session:
        redis = async_redis(settings)
        periodic = PeriodicReconcile(redis, settings, OrderApi(session, settings, NO_WAIT))
        assert await periodic.tick() == COMPLETED
        await redis.aclose()
    assert periodic.last is not None and len(periodic.last.malformed) == 1
    assert float(sync_redis.get(RedisKeys().reconcile_watermark)) > datetime.now(UTC).timestamp() - 60
    assert len(job_ids(sync_redis)) == 7


async def test_a_page_whose_only_odd_value_is_an_integer_beyond_64_bits_is_read_exactly(
    order_api: Any, api_settings: Settings, sync_redis: Any
) -> None:
    """orjson would read 2**70 as a float (1.1805916207174113e21): the page is read exactly instead."""
    order_api.state["orders"] = [card_order("BigInteger000002", created="2024-05-01T11:00:00.000Z",
                                            meta={"loyalty": 2**70 + 1})]  # fmt: skip
    assert await reconcile(api_settings, *WINDOW) == 0
    [update] = queued_updates(sync_redis, api_settings)
    assert update["meta"] == {"loyalty": str(2**70 + 1)} and update["repaired"] == ["meta.loyalty"]


async def test_an_order_list_page_past_its_bound_fails_the_run_as_an_api_failure(
    aiohttp_server: Any, make_settings: Callable[..., Settings], sync_redis: Any, capsys: Any
) -> None:
    sent = 0

    async def endless(request: web.Request) -> web.StreamResponse:
        nonlocal sent
        response = web.StreamResponse(headers={"Content-Type": "application/json"})
        await response.prepare(request)
        chunk = b"[" + b"0," * 32767
        try:
            while sent < MAX_ORDER_PAGE_BYTES + 5 * 1024 * 1024:
                await response.write(chunk)
                sent += len(chunk)
        except (ConnectionError, RuntimeError):
            pass
        return response

    app = web.Application()
    app.router.add_get("/v1/order", endless)
    server = await aiohttp_server(app)
    settings = make_settings(
        intergiro_api_url=str(server.make_url("")).rstrip("/"), intergiro_api_key="test-api-key"
    )
    assert await reconcile(settings, "--start", "2024-05-01", "--end", "2024-05-01", "--json") == 1
    captured = capsys.readouterr()
    assert json.loads(captured.out)["outcome"] == "api_failed"
    assert f"larger than {MAX_ORDER_PAGE_BYTES} bytes" in captured.err
    assert sent < MAX_ORDER_PAGE_BYTES + 5 * 1024 * 1024  # not read to its end
    assert job_ids(sync_redis) == []


@pytest.mark.parametrize("paging", ["link", "next-url", "continuation"])
async def test_every_page_of_the_order_list_is_read_however_the_api_pages(
    order_api: Any, api_settings: Settings, sync_redis: Any, capsys: Any, paging: str
) -> None:
    order_api.state["orders"] = shop_orders()[:9]
    order_api.state.update(paging=paging, page_size=2)
    assert await reconcile(api_settings, *WINDOW, "--json") == 0
    assert json.loads(capsys.readouterr().out)["orders_listed"] == 9
    assert len(order_api.state["requests"]) == 3 * 2  # per day: 3 orders on pages of 2


async def test_periodic_mode_needs_an_interval(api_settings: Settings, capsys: Any) -> None:
    assert await reconcile(api_settings, "--every") == 2
    assert capsys.readouterr().err.strip() == (
        "intergiro-receiver reconcile: RECONCILE_INTERVAL_SECONDS: must be greater than 0 for --every"
    )


@pytest.mark.parametrize(
    "argv",
    [
        ["--since", "2 parsecs"],
        ["--start", "2024-05-01"],
        ["--start", "2024-05-03", "--end", "2024-05-01"],
        ["--start", "9999-12-31", "--end", "9999-12-31"],
    ],
)
async def test_a_bad_window_is_refused_with_exit_2(
    api_settings: Settings, argv: list[str], capsys: Any
) -> None:
    assert await reconcile(api_settings, *argv) == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1


def test_reconcile_without_an_api_key_exits_2_with_one_line(redis_url: str, tmp_path: Any) -> None:
    env = {"PATH": os.environ["PATH"], "REDIS_URL": redis_url, "LOG_FORMAT": "console"}
    done = run_command("reconcile", "--since", "2h", env=env, cwd=tmp_path)
    assert done.returncode == 2
    assert done.stderr.strip() == "intergiro-receiver reconcile: INTERGIRO_API_KEY: required to list orders"


async def test_reconcile_every_runs_as_its_own_process_and_stops_cleanly_on_sigterm(
    order_api: Any, api_settings: Settings, redis_url: str, sync_redis: Any, tmp_path: Any
) -> None:
    today = datetime.now(UTC).date()
    order_api.state["orders"] = shop_orders((today,))[:2]
    env = {
        "PATH": os.environ["PATH"],
        "REDIS_URL": redis_url,
        "INTERGIRO_API_URL": api_settings.intergiro_api_url,
        "INTERGIRO_API_KEY": "test-api-key",
        "RECONCILE_INTERVAL_SECONDS": "3600",
        "LOG_FORMAT": "console",
    }
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "receiver", "reconcile", "--every", env=env, cwd=tmp_path,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    try:
        for _ in range(600):  # until its first run completed (the watermark is written last)
            if sync_redis.exists(RedisKeys().reconcile_watermark) or process.returncode is not None:
                break
            await asyncio.sleep(0.05)
        assert sync_redis.exists(RedisKeys().reconcile_watermark)
        assert len(job_ids(sync_redis)) == 4
        process.send_signal(signal.SIGTERM)
        _, err = await asyncio.wait_for(process.communicate(), timeout=30)
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    assert process.returncode == 0, err.decode()
    assert b"reconcile run" in err
    assert not sync_redis.exists(RedisKeys().reconcile_lock)


def test_the_alert_rules_use_only_metrics_the_receiver_serves() -> None:
    rules = (Path(__file__).resolve().parents[1] / "deploy/prometheus/reconcile-alerts.yml").read_text()
    used = {
        name for line in rules.splitlines() if "expr:" in line for name in re.findall(r"intergiro_\w+", line)
    }
    assert used == {
        "intergiro_reconcile_missed_events_total",
        "intergiro_reconcile_watermark_timestamp_seconds",
        "intergiro_reconcile_runs_total",
    }
    assert used <= set(SHARED_METRICS)

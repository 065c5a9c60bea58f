"""The ops console at a real scale: bulk actions by filter on 10,000 dead letters (the server applies
them in batches; the console sends the filter, never the ids), and pages of them, newest first."""

from __future__ import annotations

import re
import time
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
import redis
import structlog

from receiver.destinations import Destination
from receiver.ops.app import create_ops_app
from receiver.rediskeys import RedisKeys
from receiver.retries import RetrySchedule
from receiver.settings import Settings
from tests.deadletter_seed import seed_dead_letters
from workers.delivery import count_attempt_commands

TOKEN = "ops-scale-token-0123456789abcdefghijklmnop"
BEARER = {"Authorization": f"Bearer {TOKEN}"}
ERP = Destination("erp", handler="tests.merchant_handlers:books")


@pytest.fixture
def scale_settings(make_settings: Any) -> Settings:
    return make_settings(
        ops_token=TOKEN, extra_destinations=(ERP,), merchant_handler="tests.merchant_handlers:takes"
    )


@pytest.fixture
async def ops(aiohttp_client: Any, scale_settings: Settings, sync_redis: redis.Redis) -> Any:
    return await aiohttp_client(create_ops_app(scale_settings, redis=sync_redis))


def seed(client: redis.Redis, settings: Settings) -> None:
    """10,000 dead letters of `merchant` refused with HTTP 400, 200 of `erp` that got no answer."""
    started = time.monotonic()
    seed_dead_letters(client, settings, 10_000, "Refused")
    seed_dead_letters(client, settings, 200, "Unanswered", "erp", "POST failed: ConnectError: refused", None)
    print(f"seeded 10,200 dead letters in {time.monotonic() - started:.1f} s")


async def test_the_api_requeues_and_purges_by_filter_over_ten_thousand_dead_letters(
    ops: Any, sync_redis: redis.Redis, scale_settings: Settings
) -> None:
    seed(sync_redis, scale_settings)
    keys = RedisKeys()
    with structlog.testing.capture_logs() as logs:
        answer = await ops.post(
            "/api/dlq/requeue", json={"destination": "erp", "newer_than": "1h"}, headers=BEARER
        )
        assert (answer.status, await answer.json()) == (200, {"requeued": 200})
        assert (await (await ops.post("/api/dlq/purge", json={"status": "5xx"}, headers=BEARER)).json()) == {
            "purged": 0
        }
        answer = await ops.post(
            "/api/dlq/purge", json={"status": "4xx", "text": "refused000990"}, headers=BEARER
        )
        assert (await answer.json()) == {"purged": 10}  # Refused0009900 ... Refused0009909
        answer = await ops.post("/api/dlq/requeue", json={}, headers=BEARER)
        assert (await answer.json()) == {"requeued": 9_990}
    assert sync_redis.hlen(keys.dead_letters) == 0
    assert sync_redis.llen(keys.rq_queue) == 9_990  # each its order's head again, queued for delivery
    assert sync_redis.llen(keys.for_destination("erp").rq_queue) == 200
    lines = [line for line in logs if line["event"].startswith("ops: dead letters")]
    assert [(line["event"], line["count"], line["filter"]) for line in lines] == [
        ("ops: dead letters requeued by filter", 200, {"destination": "erp", "newer_than": 3600}),
        ("ops: dead letters purged by filter", 0, {"status": "5xx"}),
        ("ops: dead letters purged by filter", 10, {"status": "4xx", "text": "refused000990"}),
        ("ops: dead letters requeued by filter", 9_990, {}),
    ]


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        (b"", "a JSON object"),
        (b"[]", "must be a JSON object"),
        (b'{"order": "x"}', "order: not a filter key"),
        (b'{"status": "teapot"}', "status: an HTTP status"),
        (b'{"older_than": "soon"}', "older_than: a number with s, m, h, d or w"),
        (b'{"text": 5}', "text: must be a string"),
    ],
)
async def test_a_bulk_action_with_a_filter_it_cannot_use_is_400_and_changes_nothing(
    ops: Any, sync_redis: redis.Redis, scale_settings: Settings, body: bytes, reason: str
) -> None:
    seed_dead_letters(sync_redis, scale_settings, 3)
    answer = await ops.post(
        "/api/dlq/purge", data=body, headers={**BEARER, "Content-Type": "application/json"}
    )
    assert answer.status == 400 and reason in (await answer.json())["reason"]
    assert sync_redis.hlen(RedisKeys().dead_letters) == 3


async def test_the_dead_letter_page_shows_one_page_of_ten_thousand_newest_first_with_n_of_m(
    ops: Any, sync_redis: redis.Redis, scale_settings: Settings
) -> None:
    seed(sync_redis, scale_settings)
    await ops.post("/login", data={"token": TOKEN, "next": "/dlq"}, allow_redirects=False)
    first = await (await ops.get("/dlq")).text()
    assert len(first) < 100_000
    assert "1-50 of 10200" in first
    rows = re.findall(r'<tr class="entry" data-id="([^"]+)"', first)
    assert rows[0].startswith("Unanswered0000199") and len(rows) == 50  # seeded last: newest
    page_3 = await (await ops.get("/dlq?destination=merchant&per=100&page=3&sort=order&dir=asc")).text()
    assert "201-300 of 10000 matching (10200 in all)" in page_3
    rows = re.findall(r'<tr class="entry" data-id="([^"]+)"', page_3)
    assert rows == [f"Refused{n:07d}-0-order" for n in range(200, 300)]
    assert 'href="/dlq?destination=merchant&amp;sort=order&amp;dir=asc&amp;per=100&amp;page=4"' in page_3
    erp = await (await ops.get("/dlq?destination=erp&status=5xx")).text()
    assert "0 matching (10200 in all)" in erp  # no answer is no HTTP status
    erp = await (await ops.get("/dlq?destination=erp")).text()
    assert "1-50 of 200 matching (10200 in all)" in erp and "Requeue all 200 matching" in erp


def seed_retrying(client: redis.Redis) -> None:
    """10,000 updates of `merchant` waiting for a retry, the nth due in an hour and n seconds after 1 to
    5 attempts (n % 5 + 1), and 100 of `erp`, due in an hour and 20,000 + n seconds after 9 attempts;
    written by the workers' own steps."""
    soon = time.time() + 3600
    for keys, name, count, later, tries in (
        (RedisKeys(), "Retrying", 10_000, 0, None), (RedisKeys().for_destination("erp"), "ErpRetry", 100, 20_000, 9),
    ):  # fmt: skip
        schedule = RetrySchedule(client, keys)
        for n in range(count):
            order_id = f"{name}{n:07d}"
            update = {"id": f"{order_id}-0-order", "order_id": order_id}
            with client.pipeline(transaction=True) as pipe:
                for _ in range(tries or n % 5 + 1):  # the attempts made so far
                    count_attempt_commands(pipe, keys, keys.job_id(update["id"]))
                pipe.execute()
            schedule.schedule_retry(
                update, soon + later + n, "merchant answered HTTP 503", "2026-01-01T00:00:00Z", []
            )


async def test_the_retrying_page_pages_through_ten_thousand_soonest_first_sorted_as_asked_with_n_of_m(
    ops: Any, sync_redis: redis.Redis, scale_settings: Settings
) -> None:
    seed_retrying(sync_redis)
    await ops.post("/login", data={"token": TOKEN, "next": "/"}, allow_redirects=False)
    page = await (await ops.get("/retrying?per=200&page=3")).text()
    assert "401-600 of 10100 waiting for their next attempt, soonest first" in page and "page 3 of 51" in page
    assert len(page) < 250_000
    rows = re.findall(r'<tr class="retrying" data-id="([^"]+)"', page)
    assert rows == [f"Retrying{n:07d}-0-order" for n in range(400, 600)]
    assert "1-50 of 100 waiting" in await (await ops.get("/retrying?destination=erp")).text()
    latest = await (await ops.get("/retrying?dir=desc")).text()
    assert "latest first" in latest
    assert re.findall(r'<tr class="retrying" data-id="([^"]+)"', latest)[:2] == [
        "ErpRetry0000099-0-order__erp", "ErpRetry0000098-0-order__erp"
    ]  # fmt: skip
    # Most attempts first: erp's 9, then merchant's 5s (n % 5 == 4); among equals, the order turned too.
    by_attempts = await (await ops.get("/retrying?sort=attempts&dir=desc&per=200")).text()
    rows = re.findall(r'<tr class="retrying" data-id="([^"]+)"', by_attempts)
    assert rows[99:101] == ["ErpRetry0000000-0-order__erp", "Retrying0009999-0-order"]
    assert 'href="/retrying?per=200&amp;sort=attempts&amp;dir=desc&amp;page=2"' in by_attempts
    # The headers' links sort: a first click on order is A to Z, on an order already sorted, Z to A.
    assert 'href="/retrying?per=200&amp;sort=order" class="sort" id="sort-order"' in by_attempts
    by_order = await (await ops.get("/retrying?sort=order&dir=desc&page=2")).text()
    assert "51-100 of 10100" in by_order
    assert re.findall(r'<tr class="retrying" data-id="([^"]+)"', by_order)[0] == "Retrying0009949-0-order"
    by_destination = await (await ops.get("/retrying?sort=destination")).text()
    assert re.findall(r'<tr class="retrying" data-id="([^"]+)"', by_destination)[0].endswith("__erp")

    # An action returns to the page it was on, its notice said; "Retry all" means the destination shown.
    csrf = re.findall(r'name="csrf" value="([^"]+)"', by_destination)[0]
    assert 'name="sort" value="destination"' in by_destination
    kept = {"destination": "erp", "sort": "attempts", "dir": "desc", "per": "100"}
    answer = await ops.post("/retrying/retry-now", data={"csrf": csrf, **kept}, allow_redirects=False)
    assert answer.headers["Location"] == (
        "/retrying?notice=made-due&done=100&destination=erp&per=100&sort=attempts&dir=desc"
    )
    assert sync_redis.zcard(RedisKeys().for_destination("erp").retry_schedule) == 0
    assert sync_redis.zcard(RedisKeys().retry_schedule) == 10_000
    assert "100 retrying update(s) made due now" in await (await ops.get(answer.headers["Location"])).text()
    answer = await ops.post(
        "/retrying/Retrying0000007-0-order/retry-now",
        data={"csrf": csrf, "page": "3", "sort": "order"},
        allow_redirects=False,
    )
    back = parse_qs(urlsplit(answer.headers["Location"]).query)  # (these seeds have no RQ job to queue)
    assert (back["id"], back["sort"], back["page"]) == (["Retrying0000007-0-order"], ["order"], ["3"])


async def test_the_api_lists_retrying_updates_a_page_at_a_time_with_the_total_and_links(
    ops: Any, sync_redis: redis.Redis, scale_settings: Settings
) -> None:
    seed_retrying(sync_redis)
    answer = await ops.get("/api/retrying?per=500&page=2&sort=attempts&dir=desc", headers=BEARER)
    listed = await answer.json()
    assert answer.headers["X-Total-Count"] == "10100" and len(listed) == 500
    assert answer.headers["Link"] == (
        '</api/retrying?per=500&sort=attempts&dir=desc&page=3>; rel="next", '
        '</api/retrying?per=500&sort=attempts&dir=desc&page=1>; rel="prev"'
    )
    # page 1 held erp's 100 (9 attempts) and 400 of merchant's 2,000 with 5
    assert {(u["attempts"], u.get("destination")) for u in listed} == {(5, None)}
    assert listed[0]["id"] == "Retrying0007999-0-order" and listed[0]["order_id"] == "Retrying0007999"
    assert listed[0]["last_error"] == "merchant answered HTTP 503"
    first = await ops.get("/api/retrying?destination=erp", headers=BEARER)
    assert first.headers["X-Total-Count"] == "100" and "Link" in first.headers
    assert [u["id"] for u in await first.json()] == [f"ErpRetry{n:07d}-0-order__erp" for n in range(50)]
    last = await ops.get("/api/retrying?destination=erp&page=9", headers=BEARER)  # past the last: the last
    assert last.headers["Link"] == '</api/retrying?destination=erp&page=1>; rel="prev"'
    assert next(u["id"] for u in await last.json()) == "ErpRetry0000050-0-order__erp"

"""The ops console at a real scale: bulk actions by filter on 10,000 dead letters (the server applies
them in batches; the console sends the filter, never the ids), and pages of them, newest first."""

from __future__ import annotations

import re
import time
from typing import Any

import pytest
import redis
import structlog

from receiver.destinations import Destination
from receiver.ops.app import create_ops_app
from receiver.rediskeys import RedisKeys
from receiver.retries import RetrySchedule
from receiver.settings import Settings
from tests.deadletter_seed import seed_dead_letters

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


async def test_the_retrying_page_pages_through_ten_thousand_soonest_first_with_n_of_m(
    ops: Any, sync_redis: redis.Redis, scale_settings: Settings
) -> None:
    schedule = RetrySchedule(sync_redis, RedisKeys())
    soon = time.time() + 3600
    for n in range(10_000):  # the workers' own step that schedules a retry
        order_id = f"Retrying{n:07d}"
        update = {"id": f"{order_id}-0-order", "order_id": order_id}
        schedule.schedule_retry(update, soon + n, "merchant answered HTTP 503", "2026-01-01T00:00:00Z", [])
    await ops.post("/login", data={"token": TOKEN, "next": "/"}, allow_redirects=False)
    page = await (await ops.get("/retrying?per=200&page=3")).text()
    assert "401-600 of 10000 waiting" in page and "page 3 of 50" in page
    rows = re.findall(r'<tr class="retrying" data-id="([^"]+)"', page)
    assert rows == [f"Retrying{n:07d}-0-order" for n in range(400, 600)]
    assert "0 waiting" in await (await ops.get("/retrying?destination=erp")).text()

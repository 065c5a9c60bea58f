"""The merchant POST itself, against real aiohttp servers: one kept-alive connection per worker, a
connection the merchant dropped while idle is opened again without costing an attempt, and every way a
POST can fail is a retryable DeliveryError, never an exception a worker does not expect."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from aiohttp import web
from standardwebhooks.webhooks import Webhook

from tests.redis_server import free_port
from tests.sink import SECRET
from workers.delivery import DeliveryError, PermanentDeliveryError, WebhookTarget


def update(n: int) -> dict[str, Any]:
    return {"version": 1, "id": f"order{n}-0-order", "order_id": f"order{n}", "status": "ordered"}


class Merchant:
    """Records each POST with the client port it came from; `answer` shapes the response."""

    def __init__(self) -> None:
        self.posts: list[tuple[int, dict[str, str], bytes]] = []
        self.status = 200
        self.body = b"ok"
        self.delay = 0.0

    def app(self) -> web.Application:
        async def post(request: web.Request) -> web.Response:
            body = await request.read()
            peer = request.transport.get_extra_info("peername") if request.transport else ("", 0)
            self.posts.append((peer[1], dict(request.headers), body))
            if self.delay:
                await asyncio.sleep(self.delay)
            return web.Response(status=self.status, body=self.body, headers={"Retry-After": "7"})

        app = web.Application()
        app.router.add_post("/hooks", post)
        return app


async def start(aiohttp_server: Any, merchant: Merchant, **server: Any) -> WebhookTarget:
    running = await aiohttp_server(merchant.app(), **server)
    return WebhookTarget(str(running.make_url("/hooks?shop=1")), SECRET, timeout_seconds=1.0)


async def test_deliveries_share_one_kept_alive_connection_and_are_signed(aiohttp_server: Any) -> None:
    merchant = Merchant()
    target = await start(aiohttp_server, merchant)
    for n in range(5):
        await asyncio.to_thread(target, update(n))
    assert len({port for port, _, _ in merchant.posts}) == 1
    for n, (_, headers, body) in enumerate(merchant.posts):
        assert Webhook(SECRET).verify(body, headers)["id"] == f"order{n}-0-order"
        assert headers["Idempotency-Key"] == f"order{n}-0-order"


async def test_a_connection_the_merchant_closed_while_idle_is_reopened_and_the_update_posted_once(
    aiohttp_server: Any,
) -> None:
    merchant = Merchant()
    target = await start(aiohttp_server, merchant, keepalive_timeout=0.05)
    await asyncio.to_thread(target, update(1))
    await asyncio.sleep(0.3)  # the merchant closes the idle connection; the worker has not noticed
    await asyncio.to_thread(target, update(2))
    assert [body for _, _, body in merchant.posts].count(merchant.posts[-1][2]) == 1
    assert len(merchant.posts) == 2
    assert merchant.posts[0][0] != merchant.posts[1][0]


async def test_a_long_answer_is_not_read_in_full_and_the_next_post_goes_through(
    aiohttp_server: Any,
) -> None:
    merchant = Merchant()
    merchant.body = b"x" * 2_000_000
    target = await start(aiohttp_server, merchant)
    await asyncio.to_thread(target, update(1))
    await asyncio.to_thread(target, update(2))
    assert len(merchant.posts) == 2


@pytest.mark.parametrize(("status", "retryable"), [(503, True), (429, True), (408, True), (404, False)])
async def test_an_error_answer_is_a_delivery_error_with_the_merchants_retry_after(
    aiohttp_server: Any, status: int, retryable: bool
) -> None:
    merchant = Merchant()
    merchant.status = status
    target = await start(aiohttp_server, merchant)
    with pytest.raises(DeliveryError) as raised:
        await asyncio.to_thread(target, update(1))
    assert raised.value.retryable is retryable
    assert isinstance(raised.value, PermanentDeliveryError) is not retryable
    assert f"HTTP {status}" in str(raised.value)
    if retryable:
        assert raised.value.retry_after == 7.0
    merchant.status = 200
    await asyncio.to_thread(target, update(2))  # the connection is still good for the next update


async def test_a_merchant_slower_than_the_timeout_is_a_retryable_failure(aiohttp_server: Any) -> None:
    merchant = Merchant()
    merchant.delay = 3.0
    target = await start(aiohttp_server, merchant)
    with pytest.raises(DeliveryError, match="TimeoutError") as raised:
        await asyncio.to_thread(target, update(1))
    assert raised.value.retryable
    assert len(merchant.posts) == 1  # a timed-out POST is not sent again within the attempt


async def test_a_merchant_not_listening_is_a_retryable_failure() -> None:
    target = WebhookTarget(f"http://127.0.0.1:{free_port()}/hooks", SECRET, timeout_seconds=1.0)
    with pytest.raises(DeliveryError, match="ConnectionRefusedError") as raised:
        await asyncio.to_thread(target, update(1))
    assert raised.value.retryable

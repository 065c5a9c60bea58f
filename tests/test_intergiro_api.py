"""Calls to Intergiro's API from the receiver, against a fake Intergiro on loopback: no redirect is
followed, no answer is read past its bound, a verified order must be the token's, junk is refused
before it costs a call, calls in flight are capped, and an unsigned JSON order is queued only as
Intergiro's order list holds it."""

from __future__ import annotations

import asyncio
import json
import time
import tracemalloc
from typing import Any

import pytest
from aiohttp import web

from receiver.intergiro_api import MAX_VERIFY_ANSWER_BYTES
from tests.conftest import queued_updates
from tests.helpers import JSON, JWT, card_order, token

PATH = "/callbacks/intergiro"


def known_token(fake_intergiro: Any, key: Any, order_id: str = "TestOrder0000001", **extra: Any) -> bytes:
    """A token signed by a key the receiver does not trust, which the fake verify endpoint vouches for."""
    order = card_order(order_id, **extra)
    body = token(order, key)
    fake_intergiro.state["orders"][body] = order
    return body


@pytest.mark.parametrize("status", [301, 302, 303, 307, 308])
async def test_a_verify_endpoint_redirecting_is_answered_503_and_the_redirect_is_not_followed(
    remote_receiver: Any,
    fake_intergiro: Any,
    aiohttp_server: Any,
    sync_redis: Any,
    stranger_key: Any,
    status: int,
) -> None:
    elsewhere: list[bytes] = []

    async def other_host(request: web.Request) -> web.Response:
        elsewhere.append(await request.read())
        return web.json_response(card_order("InventedOrder001"))

    target_app = web.Application()
    target_app.router.add_route("*", "/{tail:.*}", other_host)
    target = await aiohttp_server(target_app)

    async def redirect(request: web.Request) -> web.Response:
        return web.Response(status=status, headers={"Location": str(target.make_url("/steal"))})

    fake_intergiro.state["verify_answer"] = redirect
    receiver = await remote_receiver()
    answer = await receiver.post(PATH, data=known_token(fake_intergiro, stranger_key), headers=JWT)
    assert answer.status == 503, await answer.text()
    assert "Retry-After" in answer.headers
    assert "redirect" in (await answer.json())["reason"]
    assert elsewhere == []  # the token (and the card token in it) never left for the other host
    assert list(sync_redis.scan_iter("*")) == []


async def test_a_verify_answer_past_its_bound_is_answered_503_without_reading_it_all(
    remote_receiver: Any, fake_intergiro: Any, sync_redis: Any, stranger_key: Any
) -> None:
    sent = 0
    chunk = b" " * 65536

    async def endless(request: web.Request) -> web.StreamResponse:
        nonlocal sent
        response = web.StreamResponse(headers={"Content-Type": "application/json"})  # no Content-Length
        await response.prepare(request)
        try:
            await response.write(b'{"id": "TestOrder0000001", "meta": "')
            while sent < MAX_VERIFY_ANSWER_BYTES + 5 * 1024 * 1024:
                await response.write(chunk)
                sent += len(chunk)
            await response.write(b'"}')
        except (ConnectionError, RuntimeError):
            pass  # the receiver hung up once it had read enough
        return response

    fake_intergiro.state["verify_answer"] = endless
    receiver = await remote_receiver()
    body = known_token(fake_intergiro, stranger_key)
    tracemalloc.start()
    try:
        answer = await receiver.post(PATH, data=body, headers=JWT)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert answer.status == 503, await answer.text()
    assert peak < 3 * MAX_VERIFY_ANSWER_BYTES  # what was read, and no more
    assert f"larger than {MAX_VERIFY_ANSWER_BYTES} bytes" in (await answer.json())["reason"]
    assert sent < MAX_VERIFY_ANSWER_BYTES + 5 * 1024 * 1024  # the receiver hung up, not read to its end
    assert list(sync_redis.scan_iter("*")) == []


async def test_a_verify_answer_announcing_a_length_past_its_bound_is_answered_503(
    remote_receiver: Any, fake_intergiro: Any, stranger_key: Any
) -> None:
    async def huge(request: web.Request) -> web.Response:
        return web.json_response({**card_order(), "meta": "x" * (MAX_VERIFY_ANSWER_BYTES + 1)})

    fake_intergiro.state["verify_answer"] = huge
    receiver = await remote_receiver()
    answer = await receiver.post(PATH, data=known_token(fake_intergiro, stranger_key), headers=JWT)
    assert answer.status == 503


async def test_a_verified_order_that_is_not_the_tokens_is_refused_401_and_queues_nothing(
    remote_receiver: Any, fake_intergiro: Any, sync_redis: Any, stranger_key: Any, capsys: Any
) -> None:
    async def another_order(request: web.Request) -> web.Response:
        return web.json_response(card_order("InventedOrder001", events=("order", "charge")))

    fake_intergiro.state["verify_answer"] = another_order
    receiver = await remote_receiver()
    answer = await receiver.post(PATH, data=known_token(fake_intergiro, stranger_key), headers=JWT)
    assert answer.status == 401, await answer.text()
    assert list(sync_redis.scan_iter("*")) == []
    logged = capsys.readouterr()
    assert "InventedOrder001" in logged.out + logged.err  # the mismatch is logged


def b64(data: bytes) -> str:
    import base64

    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def jws(header: bytes, payload: bytes, signature: bytes = b"sig") -> bytes:
    return f"{b64(header)}.{b64(payload)}.{b64(signature)}".encode()


ORDER = json.dumps(card_order()).encode()
NOT_A_JWS = {
    "x.y.z": b"x.y.z",
    "two segments": b"eyJhbGciOiJSUzI1NiJ9.eyJpZCI6IngifQ",
    "four segments": b"a.b.c.d",
    "header not JSON": jws(b"nope", b"{}"),
    "payload not JSON": jws(b'{"alg":"RS256"}', b"nope"),
    "alg none": jws(b'{"alg":"none"}', ORDER),
    "alg HS256": jws(b'{"alg":"HS256"}', ORDER),
    "not base64url": b"eyJhbGciOiJSUzI1NiJ9.e+J/aWQiOiJ4In0.c2ln",
    "empty signature": jws(b'{"alg":"RS256"}', ORDER)[: -len(b64(b"sig"))],
}


@pytest.mark.parametrize("mode", ["remote", "local-then-remote"])
@pytest.mark.parametrize("body", NOT_A_JWS.values(), ids=NOT_A_JWS.keys())
async def test_in_the_remote_modes_a_body_that_is_not_a_well_formed_jws_is_refused_400_and_never_sent(
    remote_receiver: Any, fake_intergiro: Any, sync_redis: Any, body: bytes, mode: str
) -> None:
    receiver = await remote_receiver(intergiro_verify=mode)
    answer = await receiver.post(PATH, data=body, headers=JWT)
    assert answer.status in ((400,) if mode == "remote" else (400, 401)), await answer.text()
    assert fake_intergiro.state["calls"] == 0
    assert list(sync_redis.scan_iter("*")) == []


async def test_x_y_z_in_remote_mode_is_400_and_intergiro_hears_nothing(
    remote_receiver: Any, fake_intergiro: Any
) -> None:
    receiver = await remote_receiver()
    answers = [await receiver.post(PATH, data=b"x.y.z", headers=JWT) for _ in range(20)]
    assert {a.status for a in answers} == {400}
    assert fake_intergiro.state["calls"] == 0 and fake_intergiro.state["auth"] == []


@pytest.mark.parametrize("mode", ["remote", "local-then-remote"])
async def test_a_token_for_another_audience_is_refused_401_without_asking_intergiro(
    remote_receiver: Any, fake_intergiro: Any, stranger_key: Any, mode: str
) -> None:
    receiver = await remote_receiver(intergiro_verify=mode)
    body = token(card_order(), stranger_key, audience="development")
    fake_intergiro.state["orders"][body] = card_order()
    answer = await receiver.post(PATH, data=body, headers=JWT)
    assert answer.status == 401
    assert fake_intergiro.state["calls"] == 0


async def test_a_long_alg_is_cut_short_in_the_answer(remote_receiver: Any) -> None:
    receiver = await remote_receiver()
    header = json.dumps({"alg": "A" * 190_000}).encode()
    answer = await receiver.post(PATH, data=jws(header, b"{}"), headers=JWT)
    assert answer.status == 400
    assert len(await answer.read()) < 1000


async def test_beyond_the_concurrency_cap_a_callback_is_answered_503_at_once_and_honest_ones_pass_after(
    remote_receiver: Any, fake_intergiro: Any, sync_redis: Any, settings: Any, stranger_key: Any
) -> None:
    receiver = await remote_receiver(intergiro_api_concurrency=2)
    fake_intergiro.state["gate"] = asyncio.Event()  # Intergiro slow: every verify call waits
    slow = [
        asyncio.create_task(
            receiver.post(
                PATH, data=known_token(fake_intergiro, stranger_key, f"SlowOrder{n:07d}"), headers=JWT
            )
        )
        for n in range(2)
    ]
    for _ in range(200):
        if fake_intergiro.state["calls"] == 2:
            break
        await asyncio.sleep(0.01)
    assert fake_intergiro.state["calls"] == 2

    started = time.monotonic()
    refused = await receiver.post(
        PATH, data=known_token(fake_intergiro, stranger_key, "Flood00000000001"), headers=JWT
    )
    assert refused.status == 503, await refused.text()
    assert time.monotonic() - started < 1.0  # at once, not after the slow calls
    assert int(refused.headers["Retry-After"]) > 0
    assert fake_intergiro.state["calls"] == 2  # never sent

    fake_intergiro.state["gate"].set()
    assert [a.status for a in await asyncio.gather(*slow)] == [200, 200]
    honest = await receiver.post(
        PATH, data=known_token(fake_intergiro, stranger_key, "HonestOrder00001"), headers=JWT
    )
    assert honest.status == 200, await honest.text()
    assert {u["order_id"] for u in queued_updates(sync_redis, settings)} == {
        "SlowOrder0000000",
        "SlowOrder0000001",
        "HonestOrder00001",
    }


async def test_an_unsigned_json_order_is_confirmed_by_the_order_list_and_the_apis_order_is_queued(
    remote_receiver: Any, fake_intergiro: Any, sync_redis: Any, settings: Any
) -> None:
    listed = card_order("JsonOrder0000001", events=("order",), created="2024-05-02T10:00:00.000Z")
    fake_intergiro.state["listed"] = [
        card_order("OtherOrder000001", created="2024-05-02T09:00:00.000Z"),
        listed,
    ]
    altered = {
        **listed,
        "number": "attacker-number",
        "meta": {"injected": True},
        "event": [{"type": "order", "date": "2024-05-02T10:00:01.000Z"}, {"type": "charge", "date": "2024-05-02T10:00:02.000Z"}],
    }  # fmt: skip
    receiver = await remote_receiver()
    answer = await receiver.post(PATH, data=json.dumps(altered), headers=JSON)
    assert answer.status == 200, await answer.text()
    assert (await answer.json())["queued"] == ["JsonOrder0000001-0-order"]  # no invented charge
    [update] = queued_updates(sync_redis, settings)
    assert update["order_number"] == "n-JsonOrder0000001"
    assert update["meta"] != {"injected": True}
    assert update["verified_by"] == "remote"
    assert fake_intergiro.state["list_calls"] == [{"start": "2024-05-02", "end": "2024-05-03"}]
    assert fake_intergiro.state["calls"] == 0


async def test_an_unsigned_json_order_the_order_list_does_not_hold_is_refused_401(
    remote_receiver: Any, fake_intergiro: Any, sync_redis: Any
) -> None:
    fake_intergiro.state["listed"] = [card_order("OtherOrder000001", created="2024-05-02T09:00:00.000Z")]
    invented = card_order("InventedOrder001", created="2024-05-02T10:00:00.000Z")
    receiver = await remote_receiver()
    answer = await receiver.post(PATH, data=json.dumps(invented), headers=JSON)
    assert answer.status == 401, await answer.text()
    assert list(sync_redis.scan_iter("*")) == []


async def test_an_unsigned_json_order_without_a_creation_date_is_refused_400(
    remote_receiver: Any, fake_intergiro: Any
) -> None:
    receiver = await remote_receiver()
    order = {k: v for k, v in card_order().items() if k != "created"}
    answer = await receiver.post(PATH, data=json.dumps(order), headers=JSON)
    assert answer.status == 400
    assert fake_intergiro.state["list_calls"] == []


async def test_an_unsigned_json_order_with_the_order_list_failing_is_answered_503(
    remote_receiver: Any, aiohttp_server: Any, sync_redis: Any
) -> None:
    async def failing(request: web.Request) -> web.Response:
        return web.json_response({"status": 502, "type": "fake"}, status=502)

    app = web.Application()
    app.router.add_get("/v1/order", failing)
    server = await aiohttp_server(app)
    receiver = await remote_receiver(intergiro_api_url=str(server.make_url("")).rstrip("/"))
    answer = await receiver.post(PATH, data=json.dumps(card_order()), headers=JSON)
    assert answer.status == 503
    assert list(sync_redis.scan_iter("*")) == []


async def test_orders_intergiro_answers_with_a_lone_surrogate_or_a_huge_integer_are_queued_repaired(
    remote_receiver: Any, fake_intergiro: Any, sync_redis: Any, settings: Any, stranger_key: Any
) -> None:
    """What the verify endpoint or the order list vouches for is Intergiro's own order: stored, with
    the lone surrogate as U+FFFD and the integer as its digits, never refused for its content."""
    body = known_token(fake_intergiro, stranger_key, "RemoteCut0000001", customer={"name": "Ann \ud83d"})
    fake_intergiro.state["listed"] = [
        card_order("ListedBig0000001", created="2024-05-02T10:00:00.000Z", meta={"points": 2**70})
    ]
    receiver = await remote_receiver()
    answer = await receiver.post(PATH, data=body, headers=JWT)
    assert answer.status == 200, await answer.text()
    unsigned = json.dumps({"id": "ListedBig0000001", "created": "2024-05-02T10:00:00.000Z"})
    answer = await receiver.post(PATH, data=unsigned, headers=JSON)
    assert answer.status == 200, await answer.text()
    updates = {u["order_id"]: u for u in queued_updates(sync_redis, settings)}
    assert updates["RemoteCut0000001"]["customer"]["name"] == "Ann \ufffd"
    assert updates["RemoteCut0000001"]["repaired"] == ["customer.name"]
    assert updates["ListedBig0000001"]["meta"] == {"points": str(2**70)}
    assert updates["ListedBig0000001"]["repaired"] == ["meta.points"]

"""POST /callbacks/intergiro, as Intergiro and a merchant see it."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import jwt
import pytest

from tests.conftest import queued_updates, real_callbacks
from tests.helpers import JSON, JWT, assert_valid_update, card_order, token

REAL_TOKENS = real_callbacks("order-jwt")
REAL_JSON_ORDERS = real_callbacks("order-json")
REAL_ERRORS = real_callbacks("error-json")


def claims_of(body: str) -> dict[str, Any]:
    return jwt.decode(body, options={"verify_signature": False})


def test_the_capture_holds_what_intergiro_sent() -> None:
    assert (len(REAL_TOKENS), len(REAL_JSON_ORDERS), len(REAL_ERRORS)) == (24, 3, 8)


@pytest.mark.parametrize("line", REAL_TOKENS, ids=lambda line: claims_of(line["body"])["id"])
async def test_every_real_intergiro_token_is_accepted_and_queues_one_ordered_update(
    receiver: Any, sync_redis: Any, settings: Any, line: dict[str, Any]
) -> None:
    claims = claims_of(line["body"])
    answer = await receiver.post(
        "/callbacks/intergiro", data=line["body"], headers={"Content-Type": line["content_type"]}
    )
    assert answer.status == 200, await answer.text()
    body = await answer.json()
    assert body == {
        "status": "accepted",
        "order": claims["id"],
        "queued": [f"{claims['id']}-0-order"],
        "duplicates": 0,
    }
    [update] = queued_updates(sync_redis, settings)
    assert_valid_update(update)
    assert update["event"]["type"] == "order"
    assert update["status"] == "ordered"
    assert update["amount"] == claims["payment"]["amount"]
    assert update["statuses"] == {"ordered": claims["payment"]["amount"]}
    assert update["currency"] == claims["currency"]
    assert update["verified_by"] == "local:intergiro-production"
    assert "card" not in update["payment"]
    assert claims["payment"]["card"] not in json.dumps(update)


async def test_a_replayed_real_token_is_answered_duplicate_and_queues_nothing(
    receiver: Any, sync_redis: Any, settings: Any
) -> None:
    for line in REAL_TOKENS:
        first = await receiver.post("/callbacks/intergiro", data=line["body"], headers=JWT)
        assert first.status == 200
    before = sync_redis.llen(f"rq:queue:{settings.queue_name}")
    for line in REAL_TOKENS:
        again = await receiver.post("/callbacks/intergiro", data=line["body"], headers=JWT)
        assert again.status == 200
        assert (await again.json()) == {"status": "duplicate", "order": claims_of(line["body"])["id"]}
    assert sync_redis.llen(f"rq:queue:{settings.queue_name}") == before == len(REAL_TOKENS)


@pytest.mark.parametrize("line", REAL_JSON_ORDERS, ids=lambda line: json.loads(line["body"])["id"])
async def test_a_real_json_order_is_refused_with_local_verification(
    receiver: Any, sync_redis: Any, line: dict[str, Any]
) -> None:
    answer = await receiver.post("/callbacks/intergiro", data=line["body"], headers=JSON)
    assert answer.status == 401
    assert list(sync_redis.scan_iter("rq:*")) == []


@pytest.mark.parametrize("line", REAL_JSON_ORDERS, ids=lambda line: json.loads(line["body"])["id"])
async def test_a_real_json_order_is_accepted_when_intergiro_order_list_holds_it(
    remote_receiver: Any, fake_intergiro: Any, sync_redis: Any, settings: Any, line: dict[str, Any]
) -> None:
    order = json.loads(line["body"])
    fake_intergiro.state["listed"] = [order]
    receiver = await remote_receiver()
    answer = await receiver.post("/callbacks/intergiro", data=line["body"], headers=JSON)
    assert answer.status == 200, await answer.text()
    [update] = queued_updates(sync_redis, settings)
    assert_valid_update(update)
    assert (update["order_id"], update["status"], update["verified_by"]) == (order["id"], "ordered", "remote")
    day = order["created"][:10]
    assert [call["start"] for call in fake_intergiro.state["list_calls"]] == [day]
    assert fake_intergiro.state["calls"] == 0  # an unsigned body is never posted to the verify endpoint


@pytest.mark.parametrize(
    "line", REAL_ERRORS, ids=lambda line: json.loads(line["body"])["type"].replace(" ", "-")
)
async def test_a_real_intergiro_error_object_is_noted_and_queues_nothing(
    receiver: Any, sync_redis: Any, line: dict[str, Any]
) -> None:
    answer = await receiver.post("/callbacks/intergiro", data=line["body"], headers=JSON)
    assert answer.status == 200
    assert (await answer.json()) == {"status": "error-noted"}
    assert list(sync_redis.scan_iter("rq:*")) == []
    [note] = sync_redis.lrange("igr:error-notes", 0, -1)
    assert json.loads(note)["type"] == json.loads(line["body"])["type"]
    assert b"pareq" not in note and b"4111111111111111" not in note


async def test_progressive_callbacks_queue_one_update_per_new_event(
    receiver: Any, sync_redis: Any, settings: Any, rsa_key: Any
) -> None:
    for events in (("order",), ("order", "charge"), ("order", "charge", "refund")):
        answer = await receiver.post(
            "/callbacks/intergiro", data=token(card_order(events=events), rsa_key), headers=JWT
        )
        assert answer.status == 200
        body = await answer.json()
        assert body["queued"] == [f"TestOrder0000001-{len(events) - 1}-{events[-1]}"]
        assert body["duplicates"] == len(events) - 1
    updates = sorted(queued_updates(sync_redis, settings), key=lambda u: u["event"]["sequence"])
    assert [u["status"] for u in updates] == ["ordered", "charged", "refunded"]
    assert [u["event"]["sequence"] for u in updates] == [0, 1, 2]
    for update in updates:
        assert_valid_update(update)


async def test_fifty_concurrent_posts_of_one_token_queue_each_event_once(
    receiver: Any, sync_redis: Any, settings: Any, rsa_key: Any
) -> None:
    body = token(card_order(events=("order", "charge")), rsa_key)
    answers = await asyncio.gather(
        *(receiver.post("/callbacks/intergiro", data=body, headers=JWT) for _ in range(50))
    )
    outcomes = [(await a.json())["status"] for a in answers]
    assert outcomes.count("accepted") == 1 and outcomes.count("duplicate") == 49
    assert sorted(u["id"] for u in queued_updates(sync_redis, settings)) == [
        "TestOrder0000001-0-order",
        "TestOrder0000001-1-charge",
    ]
    # one order: the first update is in the RQ queue, the second waits behind it
    assert sync_redis.lrange(f"rq:queue:{settings.queue_name}", 0, -1) == [b"TestOrder0000001-0-order"]
    assert sync_redis.lrange("igr:order:TestOrder0000001:waiting", 0, -1) == [b"TestOrder0000001-1-charge"]


async def test_an_order_without_events_queues_one_created_update(
    receiver: Any, sync_redis: Any, settings: Any, rsa_key: Any
) -> None:
    answer = await receiver.post(
        "/callbacks/intergiro", data=token(card_order(events=()), rsa_key), headers=JWT
    )
    assert (await answer.json())["queued"] == ["TestOrder0000001-created"]
    [update] = queued_updates(sync_redis, settings)
    assert_valid_update(update)
    assert (update["status"], update["event"]["sequence"], update["statuses"]) == (
        "created",
        -1,
        {"created": 448.5},
    )


async def test_snake_case_orders_are_read_like_camel_case(
    receiver: Any, sync_redis: Any, settings: Any, rsa_key: Any
) -> None:
    order = card_order()
    order["payment"] = {
        "type": "card",
        "scheme": "visa",
        "last4": "1111",
        "scheme_reference": "x",
        "card": "tok",
    }
    order["customer"] = {"name": "A", "address": {"zipCode": "123"}}
    answer = await receiver.post("/callbacks/intergiro", data=token(order, rsa_key), headers=JWT)
    assert answer.status == 200
    [update] = queued_updates(sync_redis, settings)
    assert update["customer"] == {"name": "A", "address": {"zip_code": "123"}}
    assert update["payment"] == {"type": "card", "scheme": "visa", "last4": "1111"}


async def test_a_token_with_iat_in_seconds_is_accepted_like_milliseconds(receiver: Any, rsa_key: Any) -> None:
    answer = await receiver.post(
        "/callbacks/intergiro", data=token(card_order(), rsa_key, iat=1_600_000_000), headers=JWT
    )
    assert answer.status == 200


async def test_an_es256_token_from_a_configured_key_is_accepted(receiver: Any, ec_key: Any) -> None:
    answer = await receiver.post(
        "/callbacks/intergiro", data=token(card_order(), ec_key, algorithm="ES256"), headers=JWT
    )
    assert answer.status == 200
    assert (await answer.json())["status"] == "accepted"


async def test_a_body_over_the_limit_is_answered_413(make_receiver: Any, sync_redis: Any) -> None:
    receiver = await make_receiver(max_body_bytes=4096)
    answer = await receiver.post("/callbacks/intergiro", data=b"a" * 5000, headers=JWT)
    assert answer.status == 413
    assert list(sync_redis.scan_iter("*")) == []


async def test_a_chunked_body_over_the_limit_is_answered_413(make_receiver: Any) -> None:
    receiver = await make_receiver(max_body_bytes=4096)

    async def chunks() -> Any:
        for _ in range(10):
            yield b"a" * 1000

    answer = await receiver.post("/callbacks/intergiro", data=chunks(), headers=JWT)
    assert answer.status == 413


async def test_a_chunked_body_over_the_limit_sent_in_one_piece_is_answered_413(
    make_receiver: Any, sync_redis: Any
) -> None:
    """The whole body arrives with the headers (the receiver takes it without waiting): no
    Content-Length to refuse it by, so its length is checked when taken."""
    receiver = await make_receiver(max_body_bytes=4096)
    body = b"a" * 5000
    request = (
        b"POST /callbacks/intergiro HTTP/1.1\r\nHost: test\r\nContent-Type: application/jwt\r\n"
        b"Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
        + f"{len(body):x}\r\n".encode()
        + body
        + b"\r\n0\r\n\r\n"
    )
    reader, writer = await asyncio.open_connection(receiver.host, receiver.port)
    writer.write(request)
    await writer.drain()
    answer = await reader.read()
    writer.close()
    assert answer.startswith(b"HTTP/1.1 413"), answer[:100]
    assert list(sync_redis.scan_iter("*")) == []


@pytest.mark.parametrize(
    "content_type", ["text/plain", "application/x-www-form-urlencoded", "application/jose"]
)
async def test_another_content_type_is_answered_415(receiver: Any, content_type: str) -> None:
    answer = await receiver.post(
        "/callbacks/intergiro", data=REAL_TOKENS[0]["body"], headers={"Content-Type": content_type}
    )
    assert answer.status == 415


@pytest.mark.parametrize(
    "body",
    [b"", b"hello", b"a.b.c", b"\xff\xfe.\x00.\x01", b"eyJhbGciOiJSUzI1NiJ9", b"e30.e30.", b"W10.e30.c2ln",
     b"eyJhbGciOiJSUzI1NiJ9.bm90IGpzb24.c2ln", "é.é.é".encode()],
)  # fmt: skip
async def test_garbage_instead_of_a_jwt_is_answered_4xx_and_queues_nothing(
    receiver: Any, sync_redis: Any, body: bytes
) -> None:
    answer = await receiver.post("/callbacks/intergiro", data=body, headers=JWT)
    assert answer.status in (400, 401), await answer.text()
    assert list(sync_redis.scan_iter("*")) == []


@pytest.mark.parametrize("body", [b"", b"{", b"[1,2]", b'{"id": 1}', b'"text"', b'{"a":1,"a":2}'])
async def test_garbage_json_is_answered_4xx_and_queues_nothing(
    receiver: Any, sync_redis: Any, body: bytes
) -> None:
    answer = await receiver.post("/callbacks/intergiro", data=body, headers=JSON)
    assert answer.status in (400, 401)
    assert list(sync_redis.scan_iter("*")) == []


@pytest.mark.parametrize(
    "change",
    [{"id": "has spaces in it!"}, {"currency": "kronor"}, {"items": "many"}, {"items": [{"price": "1"}]},
     {"event": {"type": "order"}}, {"event": [{"type": "teleport", "date": "x"}]}, {"payment": None},
     {"customer": 5}, {"items": -4}],
)  # fmt: skip
async def test_a_signed_token_that_is_not_an_order_is_answered_400(
    receiver: Any, sync_redis: Any, rsa_key: Any, change: dict[str, Any]
) -> None:
    answer = await receiver.post(
        "/callbacks/intergiro", data=token({**card_order(), **change}, rsa_key), headers=JWT
    )
    assert answer.status == 400, await answer.text()
    assert list(sync_redis.scan_iter("*")) == []


async def test_health_readiness_and_metrics_answer(receiver: Any, rsa_key: Any) -> None:
    await receiver.post("/callbacks/intergiro", data=token(card_order(), rsa_key), headers=JWT)
    assert (await receiver.get("/healthz")).status == 200
    assert (await receiver.get("/readyz")).status == 200
    text = await (await receiver.get("/metrics")).text()
    assert 'intergiro_callbacks_total{outcome="accepted"} 1.0' in text
    assert "intergiro_queue_depth 1.0" in text
    assert "intergiro_verification_seconds_count" in text


async def test_metrics_of_other_processes_are_served_by_the_receiver(
    receiver: Any, sync_redis: Any, settings: Any
) -> None:
    from receiver.metrics.shared import count, observe
    from receiver.rediskeys import RedisKeys

    keys = RedisKeys.of(settings)
    count(sync_redis, keys, "intergiro_deliveries_total", outcome="delivered")
    count(sync_redis, keys, "intergiro_deliveries_total", 2, outcome="delivered")
    pipe = sync_redis.pipeline()
    for seconds in (0.07, 0.003, 0.1, 100):  # 0.1 is on a bound (le: counted in it); 100 beyond the last
        observe(pipe, keys, "intergiro_delivery_seconds", seconds)
    pipe.execute()
    text = await (await receiver.get("/metrics")).text()
    assert 'intergiro_deliveries_total{outcome="delivered"} 3.0' in text
    assert 'intergiro_delivery_seconds_bucket{le="0.005"} 1.0' in text
    assert 'intergiro_delivery_seconds_bucket{le="0.05"} 1.0' in text
    assert 'intergiro_delivery_seconds_bucket{le="0.1"} 3.0' in text
    assert 'intergiro_delivery_seconds_bucket{le="30"} 3.0' in text
    assert 'intergiro_delivery_seconds_bucket{le="+Inf"} 4.0' in text
    assert "intergiro_delivery_seconds_count 4.0" in text
    assert "intergiro_delivery_seconds_sum 100.173" in text


def test_the_shipped_intergiro_keys_are_intergiros_published_ones() -> None:
    from importlib import resources

    from tests.conftest import INTERGIRO

    shipped = json.loads(resources.files("receiver").joinpath("intergiro-keys.json").read_text())
    published = json.loads((INTERGIRO / "public-keys.json").read_text())
    for environment in ("production", "development"):
        assert shipped[environment]["spki_base64"] == published[environment]["spki_base64"]

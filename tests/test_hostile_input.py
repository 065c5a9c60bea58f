"""Hostile input, round two, against `intergiro-receiver serve` as a real process on real Redis: what an
unauthenticated client sends is kept only within a bound, JSON no update can carry is a 400 naming the
field (never a 500), nothing from a client reaches a log line or an answer uncut, replays are cheap,
and the request head and the number of connections are bounded.
"""

from __future__ import annotations

import asyncio
import json
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import jwt
import pytest
import redis

from tests.conftest import pem_public
from tests.helpers import assert_valid_update, card_order
from tests.processes import RedisServer, free_port, serve_env, start_server, stop

PATH = "/callbacks/intergiro"


@dataclass
class Served:
    base: str
    port: int
    log: Path
    process: subprocess.Popen[bytes]

    def post(self, body: bytes, content_type: str = "application/jwt") -> tuple[int, bytes]:
        request = urllib.request.Request(
            self.base + PATH, data=body, method="POST", headers={"Content-Type": content_type}
        )
        try:
            with urllib.request.urlopen(request, timeout=20) as answer:
                return answer.status, answer.read()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read()

    def metric(self, name: str) -> float:
        with urllib.request.urlopen(self.base + "/metrics", timeout=10) as answer:
            for line in answer.read().decode().splitlines():
                if line.startswith(name + " ") or line.startswith(name + "{"):
                    return float(line.rsplit(" ", 1)[1])
        return 0.0


@pytest.fixture
def serve(tmp_path: Path, rsa_key: Any) -> Iterator[Callable[..., Served]]:
    """Start `intergiro-receiver serve` (a real process) with the test key trusted and more settings."""
    started: list[subprocess.Popen[bytes]] = []
    key_file = tmp_path / "trusted.pem"
    key_file.write_text(pem_public(rsa_key))

    def start(redis_url: str, **env: str) -> Served:
        port = free_port()
        log_path = tmp_path / f"serve-{port}.log"
        environment = serve_env(redis_url, port, INTERGIRO_PUBLIC_KEYS=f"@{key_file}", **env)
        process = start_server("serve", port=port, env=environment, log=log_path, cwd=tmp_path)
        started.append(process)
        return Served(f"http://127.0.0.1:{port}", port, log_path, process)

    yield start
    for process in started:
        stop(process)


def signed_with(raw_json: str, key: Any, place: Callable[[dict[str, Any]], None], order_id: str) -> bytes:
    """A trusted token of a card order where `place` put the marker "@", replaced by `raw_json` verbatim
    (JSON text no encoder would write: a lone surrogate, NaN, 1e400, a 70-bit integer)."""
    order = card_order(order_id)
    place(order)
    claims = {"iss": "payfunc", "aud": "production", "iat": int(time.time() * 1000), **order}
    payload = json.dumps(claims).replace('"@"', raw_json, 1)
    return jwt.api_jws.encode(payload.encode(), key, algorithm="RS256").encode()


def signed(order: dict[str, Any], key: Any) -> bytes:
    claims = {"iss": "payfunc", "aud": "production", "iat": int(time.time() * 1000), **order}
    return jwt.encode(claims, key, algorithm="RS256").encode()


def stored(client: redis.Redis) -> list[bytes]:
    return sorted(k for k in client.keys("*") if not k.endswith(b"metrics"))


# --- 1. an unauthenticated client cannot fill Redis ---------------------------------------------------


def test_a_flood_of_huge_error_objects_keeps_a_small_bounded_expiring_list_and_signed_callbacks_still_land(
    serve: Callable[..., Served], rsa_key: Any
) -> None:
    server = RedisServer()
    server.start()
    try:
        client = redis.Redis(port=server.port)
        room = 8 * 1024 * 1024  # far less than the flood sends (~60 MB)
        client.config_set("maxmemory", int(client.info("memory")["used_memory"]) + room)
        client.config_set("maxmemory-policy", "noeviction")
        served = serve(server.url)
        big = "x" * 190_000
        flood = 300
        for i in range(flood):
            error = {"status": 400, "type": big, "error": big[:50_000], "description": f"{i}",
                     "content": {"property": "card", "type": big[:10_000], "pareq": "secret-card-data"}}  # fmt: skip
            status, answer = served.post(json.dumps(error).encode(), "application/json")
            assert (status, json.loads(answer)) == (200, {"status": "error-noted"})
        key = b"igr:error-notes"
        assert client.llen(key) == 200  # the newest kept, the rest dropped and counted
        assert served.metric("intergiro_error_notes_dropped_total") == flood - 200
        assert 0 < client.ttl(key) <= 7 * 86400
        assert client.memory_usage(key) < 200 * 1024  # each note a few hundred bytes
        newest = json.loads(client.lindex(key, 0))
        assert newest["description"] == f"{flood - 1}" and len(newest["type"]) <= 220
        assert "pareq" not in newest["content"] and len(newest["content"]["type"]) <= 220
        status, answer = served.post(signed(card_order("AfterTheFlood001"), rsa_key))
        assert status == 200, answer
        assert json.loads(answer)["queued"] == ["AfterTheFlood001-0-order"]
    finally:
        server.cleanup()


# --- 2 and 9. JSON no update can carry as sent: stored repaired when signed, naming the field ------------

PLACES: dict[str, Callable[[dict[str, Any]], None]] = {
    "customer.name": lambda o: o.update(customer={"name": "@", "email": "a@b.se"}),
    "number": lambda o: o.update(number="@"),
    "payment.reference": lambda o: o["payment"].update(reference="@"),
    "meta.note": lambda o: o.update(meta={"note": "@"}),
    "event[0].reference": lambda o: o["event"][0].update(reference="@"),
    "items[0].name": lambda o: o["items"][0].update(name="@"),
}
# What a signed order may hold that no update can carry as sent, and what the update carries instead.
REPAIRABLE = {
    "lone surrogate": ('"cut \\ud83d"', "cut \ufffd"),
    "integer beyond 64 bits": ("1180591620717411303424", "1180591620717411303424"),
    "1e400": ("1e400", "1e400"),
}
NOT_JSON = {"NaN": "NaN", "Infinity": "-Infinity"}


def value_at(update: dict[str, Any], place: str) -> Any:
    """The value of an update at the place an order spells (`customer.name`, `event[0].reference`)."""
    if place == "number":
        return update["order_number"]
    if place.startswith("event[0]."):
        return update["event"][place.removeprefix("event[0].")]
    first, _, rest = place.partition(".")
    return update[first][rest]


def test_signed_values_no_update_carries_as_sent_are_stored_repaired_naming_the_field_on_every_retry(
    serve: Callable[..., Served], redis_url: str, sync_redis: redis.Redis, rsa_key: Any
) -> None:
    """A verified callback is never refused for its content: a lone surrogate becomes U+FFFD, a huge
    number the string of its digits, and the update names the place; the retry is a duplicate."""
    served = serve(redis_url)
    for n, (place, put) in enumerate(PLACES.items()):
        if place == "items[0].name":
            continue  # item names are not carried by updates (only their amounts)
        for what, (raw, carried) in REPAIRABLE.items():
            if place != "meta.note" and not raw.startswith('"'):
                continue  # a number in a field the update promises to be a string: below
            order_id = f"Hostile{n:02d}{len(what):02d}000"
            body = signed_with(raw, rsa_key, put, order_id)
            status, answer = served.post(body)
            assert status == 200, (place, what, answer)
            assert json.loads(answer)["queued"] == [f"{order_id}-0-order"]
            status, answer = served.post(body)  # Intergiro retries: a duplicate, never a refusal
            assert (status, json.loads(answer)["status"]) == (200, "duplicate"), (place, what, answer)
            data = json.loads(sync_redis.hget(f"rq:job:{order_id}-0-order", "data"))
            update = data[2][0]
            assert_valid_update(update)
            assert value_at(update, place) == carried, (place, what, update)
            assert update["repaired"] == [place], (place, what, update)
    # the item's name is not carried, but the order is stored all the same
    status, answer = served.post(
        signed_with('"\\ud83d"', rsa_key, PLACES["items[0].name"], "HostileItemName01")
    )
    assert status == 200, answer
    # NaN and Infinity are no JSON: refused, naming the place, the same on every retry
    for what, raw in NOT_JSON.items():
        body = signed_with(raw, rsa_key, PLACES["meta.note"], f"NotJson{len(what):02d}0000000")
        for _ in range(2):
            status, answer = served.post(body)
            assert status == 400, (what, answer)
            assert (
                "meta.note" in json.loads(answer)["reason"] and "not finite" in json.loads(answer)["reason"]
            )
    # the same values unauthenticated, in an Error object or at the top of a JSON body: refused
    unsigned = [raw for raw, _ in REPAIRABLE.values()] + list(NOT_JSON.values())
    before = stored(sync_redis)
    for raw in unsigned:
        status, answer = served.post(f'{{"status": 400, "type": {raw}}}'.encode(), "application/json")
        assert status == 400, answer
        status, answer = served.post(f'{{"status": {raw}, "type": "x"}}'.encode(), "application/json")
        assert status == 400, answer
    assert stored(sync_redis) == before
    assert "Traceback" not in served.log.read_text()


# --- 5. nothing from a client reaches a log line or an answer uncut ----------------------------------


def test_a_huge_algorithm_name_and_a_huge_error_type_are_cut_short_in_answers_and_log_lines(
    serve: Callable[..., Served], redis_url: str, rsa_key: Any
) -> None:
    served = serve(redis_url)
    alg = "A" * 190_000
    header = jwt.utils.base64url_encode(json.dumps({"alg": alg, "typ": "JWT"}).encode())
    status, answer = served.post(header + b".eyJhIjoxfQ.c2ln")
    assert status == 401 and len(answer) < 1024, (status, len(answer))
    status, _ = served.post(json.dumps({"status": 400, "type": "T" * 200_000}).encode(), "application/json")
    assert status == 200
    time.sleep(0.3)  # let the lines reach the file
    lines = served.log.read_text().splitlines()
    assert any("callback rejected" in line for line in lines)
    assert any("intergiro error object received" in line for line in lines)
    assert max(len(line) for line in lines) < 1024


# --- 6. replays are cheap; what one callback may carry is bounded -----------------------------------


def commands(client: redis.Redis, name: str) -> int:
    return int(client.info("commandstats").get(f"cmdstat_{name}", {}).get("calls", 0))


def test_a_replayed_long_event_list_is_answered_from_one_read_without_running_the_intake_script(
    serve: Callable[..., Served], redis_url: str, sync_redis: redis.Redis, rsa_key: Any
) -> None:
    served = serve(redis_url, MAX_CALLBACK_EVENTS="1000")
    events = ("order", "charge", *["refund"] * 997)
    order = card_order("LongReplay000001", events=events, items=100_000)
    body = signed(order, rsa_key)
    status, answer = served.post(body)
    assert status == 200 and len(json.loads(answer)["queued"]) == 999, answer[:300]
    scripts = commands(sync_redis, "evalsha") + commands(sync_redis, "eval")
    written = int(sync_redis.info("stats")["total_net_input_bytes"])
    for _ in range(3):
        status, answer = served.post(body)
        assert (status, json.loads(answer)) == (200, {"status": "duplicate", "order": "LongReplay000001"})
    assert commands(sync_redis, "evalsha") + commands(sync_redis, "eval") == scripts
    # three replays sent Redis a few hundred bytes each, not the 1,000 updates' job data again
    assert int(sync_redis.info("stats")["total_net_input_bytes"]) - written < 3 * 40_000
    # one new event at the end: only it is queued
    status, answer = served.post(signed({**order, "event": [*order["event"], order["event"][-1]]}, rsa_key))
    assert json.loads(answer) == {
        "status": "accepted", "order": "LongReplay000001", "queued": ["LongReplay000001-999-refund"],
        "duplicates": 999,
    }  # fmt: skip


def test_meta_customer_and_event_lists_over_their_limits_are_answered_413_and_store_nothing(
    serve: Callable[..., Served], redis_url: str, sync_redis: redis.Redis, rsa_key: Any
) -> None:
    served = serve(redis_url)
    too_much = {
        "meta": card_order("TooMuchMeta00001", meta={"blob": "m" * 20_000}),
        "customer": card_order("TooMuchCustomer1", customer={"name": "c" * 5_000}),
        "events": card_order("TooManyEvents001", events=("order", *["refund"] * 200)),
    }
    for what, order in too_much.items():
        status, answer = served.post(signed(order, rsa_key))
        assert status == 413, (what, answer)
        assert what.rstrip("s") in json.loads(answer)["reason"]
    assert stored(sync_redis) == []
    just_fits = card_order("JustFits00000001", events=("order", *["refund"] * 199), meta={"b": "m" * 16_000})
    assert served.post(signed(just_fits, rsa_key))[0] == 200


# --- 7. the request head and the number of connections are bounded ------------------------------------


def raw_exchange(port: int, data: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as connection:
        connection.sendall(data)
        answer = b""
        while chunk := connection.recv(65536):
            answer += chunk
        return answer


def test_oversized_request_heads_are_refused_and_connections_past_the_limit_answered_503(
    serve: Callable[..., Served], redis_url: str, rsa_key: Any
) -> None:
    served = serve(redis_url, RECEIVER_MAX_CONNECTIONS="8")
    head = f"POST {PATH} HTTP/1.1\r\nHost: r\r\nContent-Type: application/jwt\r\nContent-Length: 3\r\n"
    long_line = raw_exchange(served.port, (head + "X-Junk: " + "j" * 5000 + "\r\n\r\na.b").encode())
    assert long_line.split(b" ", 2)[1] == b"400" and len(long_line) < 1024, long_line[:200]
    many = raw_exchange(
        served.port, (head + "".join(f"X-{i}: v\r\n" for i in range(40)) + "\r\na.b").encode()
    )
    assert many.split(b" ", 2)[1] == b"400" and len(many) < 1024, many[:200]

    hostile = []
    for _ in range(8):  # each sends half a request head and waits
        connection = socket.create_connection(("127.0.0.1", served.port), timeout=10)
        connection.sendall(head.encode())
        hostile.append(connection)
    time.sleep(0.3)
    busy = raw_exchange(served.port, (head + "\r\na.b").encode())
    assert busy.startswith(b"HTTP/1.1 503") and b"Retry-After: 1" in busy, busy[:200]
    for connection in hostile:
        connection.close()
    time.sleep(0.3)
    status, answer = served.post(signed(card_order("AfterTheCrowd001"), rsa_key))
    assert status == 200, answer
    assert served.metric("intergiro_connections_refused_total") >= 1


# --- Round three. 3: unsigned orders cannot multiply calls to Intergiro -------------------------------


async def post_async(
    served: Served, body: bytes, content_type: str = "application/json"
) -> tuple[int, bytes]:
    """POST off the event loop's way (the fake Intergiro the receiver calls runs on this loop)."""
    async with aiohttp.ClientSession() as session:
        async with session.post(
            served.base + PATH, data=body, headers={"Content-Type": content_type}
        ) as answer:
            return answer.status, await answer.read()


def unsigned(order_id: str, created: str = "2024-05-02T10:00:00.000Z") -> bytes:
    return json.dumps({"id": order_id, "created": created}).encode()


async def test_a_flood_of_unsigned_orders_reads_a_days_list_once_and_reuses_its_not_found_answer(
    serve: Callable[..., Served], redis_url: str, sync_redis: redis.Redis, order_api: Any
) -> None:
    """Before: each of 11 posts of an unknown id read the whole 20-page day (220 list reads)."""
    order_api.state.update(paging="link", page_size=50)
    order_api.state["orders"] = [
        card_order(f"Listed{n:010d}", created="2024-05-02T09:00:00.000Z") for n in range(1000)
    ]
    served = serve(
        redis_url, INTERGIRO_VERIFY="local-then-remote", INTERGIRO_API_KEY="test-api-key",
        INTERGIRO_API_URL=str(order_api.make_url("")).rstrip("/"),
    )  # fmt: skip
    flood = await asyncio.gather(*(post_async(served, unsigned(f"Unknown{n:09d}")) for n in range(11)))
    assert [status for status, _ in flood] == [401] * 11, flood
    reads = len(order_api.state["requests"])
    assert reads == 20, reads  # the day read once, to its end, while the others waited for it
    for n in range(11, 30):  # seconds later: not found in that read, so not found
        assert (await post_async(served, unsigned(f"Unknown{n:09d}")))[0] == 401
    assert len(order_api.state["requests"]) == reads
    # a listed order is never answered from memory: it is read afresh, and queued
    status, answer = await post_async(served, unsigned("Listed0000000999"))
    assert status == 200, answer
    assert len(order_api.state["requests"]) == reads + 20
    assert stored(sync_redis) != []


# --- Round three. 7: an out-of-range date is a 400, never a 500 --------------------------------------


async def test_an_unsigned_order_created_on_a_far_future_day_is_answered_400_without_a_call(
    serve: Callable[..., Served], redis_url: str, order_api: Any
) -> None:
    served = serve(
        redis_url, INTERGIRO_VERIFY="remote", INTERGIRO_API_KEY="test-api-key",
        INTERGIRO_API_URL=str(order_api.make_url("")).rstrip("/"),
    )  # fmt: skip
    for created in ("9999-12-31", "9999-12-31T23:59:59.999Z", "3024-01-01T00:00:00Z"):
        status, answer = await post_async(served, unsigned("FarFuture0000001", created))
        assert status == 400, (created, answer)
        assert "future" in json.loads(answer)["reason"]
    assert order_api.state["requests"] == []
    assert "Traceback" not in served.log.read_text()


# --- Round three. 8: no bytes make the receiver answer 500 -------------------------------------------


def raw_status(port: int, head: bytes, body: bytes) -> bytes:
    request = head + b"Content-Length: " + str(len(body)).encode() + b"\r\nConnection: close\r\n\r\n" + body
    return raw_exchange(port, request)


def test_unreadable_bytes_in_the_heads_and_bodies_of_callbacks_are_answered_4xx_never_500(
    serve: Callable[..., Served], redis_url: str, sync_redis: redis.Redis, rsa_key: Any
) -> None:
    served = serve(redis_url)
    bad = b"\xe9\xff"
    good = signed(card_order("ReadableBytes001"), rsa_key)
    start = b"POST " + PATH.encode() + b" HTTP/1.1\r\nHost: r\r\n"
    cases = {
        "content type": (start + b"Content-Type: application/jwt" + bad + b"\r\n", good),
        "charset": (start + b"Content-Type: application/json; charset=" + bad + b"\r\n", b"{}"),
        "request id": (start + b"Content-Type: application/jwt\r\nX-Request-ID: " + bad + b"\r\n", bad),
        "traceparent": (start + b"Content-Type: application/jwt\r\ntraceparent: 00-" + bad + b"\r\n", bad),
        "json body": (start + b"Content-Type: application/json\r\n", b'{"id": "' + bad + b'"}'),
        "token body": (start + b"Content-Type: application/jwt\r\n", good[:20] + bad + good[22:]),
    }
    for what, (head, body) in cases.items():
        answer = raw_status(served.port, head, body)
        status = int(answer.split(b" ", 2)[1])
        assert 400 <= status < 500, (what, answer[:300])
    assert stored(sync_redis) == []
    assert "Traceback" not in served.log.read_text()

"""Hostile input, round three, against `intergiro-receiver ops` as a real process on real Redis: guessing
the token is slowed before any token is checked and holds no memory, signing out ends the session on
the server, `next` and notices cannot be steered from outside, dead-letter actions say exactly what they
did, and no bytes make the console answer 500.
"""

from __future__ import annotations

import asyncio
import os
import re
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import redis

from receiver.app import CALLBACK_PATH
from receiver.ops.auth import COOKIE
from receiver.rediskeys import RedisKeys
from receiver.settings import Settings
from tests.helpers import JWT, card_order, token
from tests.processes import free_port, start_server, stop
from tests.sink import Sink, wait_for
from tests.test_fanout import destinations_env, receiver_for
from workers.runner import retire_removed_destinations

TOKEN = "hostile-console-token-0123456789abcdefgh"
BEARER = {"Authorization": f"Bearer {TOKEN}"}


@dataclass
class Console:
    base: str
    port: int
    log: Path
    process: subprocess.Popen[bytes]

    def rss_kib(self) -> int:
        """The console process's resident memory."""
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        raise AssertionError("no VmRSS")

    def raw(self, data: bytes) -> bytes:
        """Send `data` as it is (bytes no client library would send) and read the whole answer."""
        with socket.create_connection(("127.0.0.1", self.port), timeout=20) as connection:
            connection.sendall(data)
            answer = b""
            while chunk := connection.recv(65536):
                answer += chunk
            return answer


@pytest.fixture
def start_console(redis_url: str, tmp_path: Path) -> Iterator[Callable[..., Console]]:
    """Starts `intergiro-receiver ops` as its own process, on the suite's Redis, with more settings."""
    started: list[subprocess.Popen[bytes]] = []

    def start(**more: str) -> Console:
        port = free_port()
        env = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith(("OPS_", "HTTP", "NO_PROXY", "DESTINATION", "MERCHANT_"))
        }
        env.update(REDIS_URL=redis_url, OPS_TOKEN=TOKEN, OPS_PORT=str(port), LOG_FORMAT="json", **more)
        log = tmp_path / f"ops-{port}.log"
        process = start_server("ops", port=port, env=env, log=log)
        started.append(process)
        return Console(f"http://127.0.0.1:{port}", port, log, process)

    yield start
    for process in started:
        stop(process)


@pytest.fixture
def console(start_console: Callable[..., Console]) -> Console:
    """`intergiro-receiver ops` as its own process, on the suite's Redis."""
    return start_console()


async def sign_in(session: aiohttp.ClientSession, console: Console) -> tuple[str, str]:
    """Sign in through the form: (the session cookie, its CSRF token read off a page's form)."""
    async with session.post(
        console.base + "/login", data={"token": TOKEN, "next": "/"}, allow_redirects=False
    ) as answer:
        assert answer.status == 303, await answer.text()
        cookie = answer.cookies[COOKIE].value
    async with session.get(console.base + "/retrying", headers={"Cookie": f"{COOKIE}={cookie}"}) as page:
        [csrf] = re.findall(r'name="csrf" value="([^"]+)"', await page.text())[:1]
    return cookie, csrf


def with_cookie(cookie: str) -> dict[str, str]:
    return {"Cookie": f"{COOKIE}={cookie}"}


# --- 1. sign-in guessing is slowed before any token is checked, in bounded memory -------------------


async def test_after_a_wrong_token_no_token_is_checked_for_a_second_and_sessions_go_on(
    console: Console,
) -> None:
    async with aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar()) as session:
        cookie, _ = await sign_in(session, console)
        wrong = {"token": "w" * 40, "next": "/"}
        async with session.post(console.base + "/login", data=wrong, allow_redirects=False) as answer:
            assert answer.status == 401
        # the right token right after a wrong one: not looked at, not a session
        async with session.post(
            console.base + "/login", data={"token": TOKEN, "next": "/"}, allow_redirects=False
        ) as answer:
            assert answer.status == 429 and answer.headers["Retry-After"] == "1", await answer.text()
            assert COOKIE not in answer.cookies
        async with session.get(console.base + "/api/overview", headers=BEARER) as answer:
            assert answer.status == 429 and answer.headers["Retry-After"] == "1"
            assert (await answer.json())["error"] == "too_many_requests"
        # a signed-in operator is not locked out meanwhile
        async with session.get(console.base + "/api/overview", headers=with_cookie(cookie)) as answer:
            assert answer.status == 200
        await asyncio.sleep(1.1)  # as Retry-After says
        async with session.get(console.base + "/api/overview", headers=BEARER) as answer:
            assert answer.status == 200


async def test_a_flood_of_wrong_guesses_checks_one_a_second_and_holds_no_memory(console: Console) -> None:
    """3,000 wrong guesses sent without waiting (form and bearer): answered at once, almost all 429
    without being checked; the process holds no more memory for them (one waiting task per guess
    held about 33 MB and queued them for 50 minutes); the right token then works after Retry-After."""
    connector = aiohttp.TCPConnector(limit=100)
    async with aiohttp.ClientSession(connector=connector, cookie_jar=aiohttp.DummyCookieJar()) as session:
        before = console.rss_kib()
        loop = asyncio.get_running_loop()
        started = loop.time()

        async def guess(n: int) -> int:
            if n % 2:
                headers = {"Authorization": f"Bearer guess-{n:036d}"}
                async with session.get(console.base + "/api/overview", headers=headers) as answer:
                    return answer.status
            data = {"token": f"guess-{n:036d}", "next": "/"}
            async with session.post(console.base + "/login", data=data, allow_redirects=False) as answer:
                return answer.status

        statuses = await asyncio.gather(*(guess(n) for n in range(3000)))
        elapsed = loop.time() - started
        grown = console.rss_kib() - before
        checked = statuses.count(401)
        assert statuses.count(429) + checked == 3000
        assert 1 <= checked <= int(elapsed) + 2, (checked, elapsed)  # at most one guess per second
        print(f"3000 guesses in {elapsed:.1f} s: {checked} checked, RSS +{grown} KiB")
        assert grown < 8 * 1024, grown
        await asyncio.sleep(1.1)
        async with session.get(console.base + "/api/overview", headers=BEARER) as answer:
            assert answer.status == 200
    lines = console.log.read_text().count("ops sign-in refused")
    assert lines == checked  # one line per guess checked; a flood does not flood the log


# --- 2. signing out ends the session on the server -----------------------------------------------


async def test_signing_out_ends_that_session_on_the_server_and_no_other(console: Console) -> None:
    async with aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar()) as session:
        leaving, csrf = await sign_in(session, console)
        staying, _ = await sign_in(session, console)
        async with session.post(
            console.base + "/logout", data={"csrf": csrf}, headers=with_cookie(leaving), allow_redirects=False
        ) as answer:
            assert answer.status == 303 and answer.headers["Location"] == "/login"
        # the old cookie, kept or copied, opens nothing any more
        async with session.get(console.base + "/api/overview", headers=with_cookie(leaving)) as answer:
            assert answer.status == 401
        async with session.get(
            console.base + "/", headers=with_cookie(leaving), allow_redirects=False
        ) as answer:
            assert answer.status == 303 and answer.headers["Location"].startswith("/login")
        async with session.get(console.base + "/api/overview", headers=with_cookie(staying)) as answer:
            assert answer.status == 200
    assert "ops signed out" in console.log.read_text()


# --- 8. no bytes make the console answer 500 ------------------------------------------------------

BAD = b"\xe9\xff"


def status_of(answer: bytes) -> int:
    return int(answer.split(b" ", 2)[1])


def form_post(path: bytes, body: bytes, headers: bytes = b"") -> bytes:
    return (
        b"POST " + path + b" HTTP/1.1\r\nHost: ops\r\nConnection: close\r\n" + headers
        + b"Content-Type: application/x-www-form-urlencoded\r\nContent-Length: " + str(len(body)).encode()
        + b"\r\n\r\n" + body
    )  # fmt: skip


def get(path: bytes, headers: bytes = b"") -> bytes:
    return b"GET " + path + b" HTTP/1.1\r\nHost: ops\r\nConnection: close\r\n" + headers + b"\r\n"


def test_unreadable_bytes_in_a_cookie_a_bearer_token_a_form_or_a_query_are_answered_4xx_never_500(
    console: Console,
) -> None:
    """Bytes that are no UTF-8 where a credential goes: refused as a wrong credential (and counted as a
    failed sign-in where a token was checked), never a 500 and a traceback."""
    requests = {
        "bearer": get(b"/api/overview", b"Authorization: Bearer " + BAD + b"\r\n"),
        "cookie": get(b"/api/overview", b"Cookie: " + COOKIE.encode() + b"=" + BAD + b"\r\n"),
        "cookie, page": get(b"/", b"Cookie: " + COOKIE.encode() + b"=1." + BAD + b".x\r\n"),
        "form token": form_post(b"/login", b"token=%E9%FF&next=/"),
        "raw form token": form_post(b"/login", b"token=" + BAD + b"&next=" + BAD),
        "next": get(b"/login?next=%E9%FF"),
        "notice": get(b"/login?notice=%E9%FF%00"),
    }
    signed_in = console.raw(form_post(b"/login", b"token=" + TOKEN.encode() + b"&next=/"))
    [cookie] = re.findall(COOKIE.encode() + rb"=([^;]+);", signed_in)
    own = b"Cookie: " + COOKIE.encode() + b"=" + cookie + b"\r\n"
    requests["csrf"] = form_post(b"/logout", b"csrf=%E9%FF", own)
    requests["raw csrf"] = form_post(b"/logout", b"csrf=" + BAD, own)
    requests["csrf header"] = form_post(b"/api/dlq/x/purge", b"", own + b"X-CSRF-Token: " + BAD + b"\r\n")
    for what, request in requests.items():
        answer = console.raw(request)
        assert status_of(answer) < 500, (what, answer[:300])
        if what in ("bearer", "cookie", "form token", "raw form token") or "csrf" in what:
            assert status_of(answer) in (400, 401, 403), (what, answer[:300])
        time.sleep(1.05)  # past the sign-in lockout a refused token starts
    assert "Traceback" not in console.log.read_text()
    assert console.log.read_text().count("ops sign-in refused") >= 3  # bearer and both form tokens


# --- 4 and 5. `next` and the notice box cannot be steered from a link --------------------------------


async def test_sign_in_follows_next_only_to_a_printable_path_of_this_site(console: Console) -> None:
    """Browsers drop tabs and newlines from a URL: `/\\t/evil.example` is `//evil.example`, another host."""
    hostile = ["/\t/evil.example/phish", "/\n/evil.example", "/\r/evil.example", "/\x00/evil", "/\\evil.example",
               "//evil.example", "https://evil.example/", "/ /evil.example", "/\x7f/evil", "/\u2028/evil"]  # fmt: skip
    async with aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar()) as session:
        for target in hostile:
            async with session.get(console.base + "/login", params={"next": target}) as page:
                assert 'name="next" value="/"' in await page.text(), repr(target)
            async with session.post(
                console.base + "/login", data={"token": TOKEN, "next": target}, allow_redirects=False
            ) as answer:
                assert answer.headers["Location"] == "/", repr(target)
        async with session.post(
            console.base + "/login", data={"token": TOKEN, "next": "/dlq?q=x%2Fy"}, allow_redirects=False
        ) as answer:
            assert answer.headers["Location"] == "/dlq?q=x%2Fy"  # a path of this site is kept


async def test_the_notice_box_shows_only_the_consoles_own_sentences(console: Console) -> None:
    phishing = "Your session expired: sign in again at evil.example"
    async with aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar()) as session:
        cookie, _ = await sign_in(session, console)
        for path in ("/login", "/", "/dlq", "/retrying"):
            for query in ({"notice": phishing}, {"notice": "requeued", "done": phishing, "asked": "1"},
                          {"notice": "retrying", "id": phishing}):  # fmt: skip
                async with session.get(
                    console.base + path, params=query, headers=with_cookie(cookie)
                ) as page:
                    text = await page.text()
                    assert "evil.example" not in text and 'class="notice"' not in text, (path, query)
        query = {"notice": "requeued", "done": "1", "asked": "2"}
        async with session.get(console.base + "/dlq", params=query, headers=with_cookie(cookie)) as page:
            assert "requeued 1 of 2 update(s)" in await page.text()


# --- 6. a dead-letter action says exactly what it did ------------------------------------------------


async def test_purging_or_requeueing_an_update_that_is_not_a_dead_letter_changes_nothing_and_is_404(
    console: Console, receiver: Any, rsa_key: Any, sync_redis: redis.Redis
) -> None:
    """Before: purge answered 404 but deleted the queued update's RQ job (dead-lettered later as
    "job deleted outside")."""
    answer = await receiver.post(
        CALLBACK_PATH, data=token(card_order("StillQueued00001"), rsa_key), headers=JWT
    )
    assert answer.status == 200
    update_id = "StillQueued00001-0-order"
    before = {key: sync_redis.dump(key) for key in sync_redis.keys("rq:*")}
    async with aiohttp.ClientSession() as session:
        for action in ("purge", "requeue"):
            async with session.post(f"{console.base}/api/dlq/{update_id}/{action}", headers=BEARER) as answer:
                assert answer.status == 404, action
                assert "not in the dead-letter queue" in (await answer.json())["reason"]
    assert {key: sync_redis.dump(key) for key in sync_redis.keys("rq:*")} == before
    assert sync_redis.exists(f"rq:job:{update_id}")


async def test_requeueing_a_dead_letter_for_a_destination_no_longer_configured_is_refused_with_the_reason(
    start_console: Callable[..., Console], make_receiver: Any, sink: Sink, rsa_key: Any, workers: Any,
    sync_redis: redis.Redis, redis_url: str,
) -> None:  # fmt: skip
    """Before: "requeued", onto a queue no worker serves (`dlq requeue` refused the same)."""
    both, only_erp = destinations_env(sink, sink), destinations_env(sink)
    receiver = await receiver_for(make_receiver, both)
    answer = await receiver.post(
        CALLBACK_PATH, data=token(card_order("Removed000000001"), rsa_key), headers=JWT
    )
    assert answer.status == 200
    retire_removed_destinations(Settings.from_env({**both, "REDIS_URL": redis_url}, dotenv=False))
    workers(**only_erp)  # warehouse removed from the configuration: its copy is dead-lettered
    await wait_for(lambda: sync_redis.hlen(RedisKeys().dead_letters) == 1, what="warehouse's dead letter")
    dead = "Removed000000001-0-order__warehouse"
    console = start_console(**only_erp)
    warehouse_queue = RedisKeys().for_destination("warehouse").rq_queue
    async with aiohttp.ClientSession() as session:
        async with session.post(f"{console.base}/api/dlq/{dead}/requeue", headers=BEARER) as answer:
            assert answer.status == 409, await answer.text()
            body = await answer.json()
            assert body["error"] == "destination_not_configured"
            assert "warehouse" in body["reason"] and "not requeued" in body["reason"]
    assert sync_redis.hexists(RedisKeys().dead_letters, dead)
    assert not sync_redis.exists(warehouse_queue)
    assert "ops: dead letter not requeued" in console.log.read_text()


# --- also noted: behind a TLS-terminating proxy the session cookie is Secure ------------------------


async def test_the_session_cookie_is_secure_behind_a_proxy_only_when_its_forwarded_proto_is_trusted(
    start_console: Callable[..., Console],
) -> None:
    forwarded = {"X-Forwarded-Proto": "https"}
    form = {"token": TOKEN, "next": "/"}
    async with aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar()) as session:
        for trust, header, secure in (
            ("false", forwarded, False),
            ("true", forwarded, True),
            ("true", {}, False),
        ):
            console = start_console(OPS_TRUST_FORWARDED_PROTO=trust)
            async with session.post(
                console.base + "/login", data=form, headers=header, allow_redirects=False
            ) as answer:
                assert answer.status == 303
                assert bool(answer.cookies[COOKIE]["secure"]) is secure, (trust, header)


# --- also noted: the overview says Error objects are unauthenticated --------------------------------


async def test_the_overview_labels_error_objects_as_unauthenticated_notes(
    console: Console, receiver: Any
) -> None:
    posted = {"status": 400, "type": "malformed content", "description": "posted by anyone"}
    answer = await receiver.post(CALLBACK_PATH, json=posted)
    assert (await answer.json()) == {"status": "error-noted"}
    async with aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar()) as session:
        cookie, _ = await sign_in(session, console)
        async with session.get(console.base + "/", headers=with_cookie(cookie)) as page:
            text = await page.text()
    assert "posted by anyone" in text
    heading = text.split('<h2 id="error-notes">', 1)[1].split("</p>", 1)[0]
    assert "Unauthenticated" in heading and "anyone who can reach the callback URL" in heading
    assert "Intergiro Error objects" not in text

"""The ops console's JSON API and sign-in: every endpoint with and without credentials, the CSRF guard,
and its actions on real dead letters and retries (real Redis, a real receiver, real worker processes,
a real HTTP sink)."""

from __future__ import annotations

import asyncio
import json
import os
import re
import time
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
import redis

from receiver.app import KEYS as RECEIVER_KEYS
from receiver.app import METRICS, REDIS
from receiver.ops.app import create_ops_app, make_sign_in_link
from receiver.ops.auth import COOKIE
from receiver.rediskeys import RedisKeys
from receiver.settings import Settings
from tests.processes import ROOT, run_command
from tests.sink import Sink, wait_for
from tests.test_workers import post_dead_lettered, post_order, webhook_settings

TOKEN = "ops-test-token-0123456789abcdefghijklmnop"
BEARER = {"Authorization": f"Bearer {TOKEN}"}
GETS = ("/api/overview", "/api/dlq", "/api/orders/SomeOrder", "/api/retrying")
POSTS = ("/api/dlq/SomeOrder-0-order/requeue", "/api/dlq/SomeOrder-0-order/purge")
PAGES = ("/", "/dlq", "/dlq/SomeOrder-0-order", "/orders?key=x", "/retrying")


@pytest.fixture
async def ops(aiohttp_client: Any, settings: Settings, sync_redis: redis.Redis) -> Any:
    """A test client of the console (signed in with nothing: each test sends what it sends)."""
    app = create_ops_app(settings.with_changes(ops_token=TOKEN), redis=sync_redis, lockout_seconds=0.05)
    return await aiohttp_client(app)


async def eventually(check: Callable[[], Awaitable[bool]], seconds: float = 30.0, what: str = "it") -> None:
    deadline = time.monotonic() + seconds
    while not await check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.1)


async def sign_in(ops: Any) -> str:
    """Sign in through the form; returns the CSRF token of the session (read off a page's form)."""
    answer = await ops.post("/login", data={"token": TOKEN, "next": "/dlq"}, allow_redirects=False)
    assert answer.status == 303 and answer.headers["Location"] == "/dlq"
    cookie = answer.cookies[COOKIE]
    assert cookie["httponly"] and cookie["samesite"] == "Strict" and int(cookie["max-age"]) > 0
    assert not cookie["secure"]  # plain HTTP here; over TLS it is Secure
    page = await (await ops.get("/retrying")).text()
    [csrf] = re.findall(r'name="csrf" value="([^"]+)"', page)[:1]
    return csrf


def test_ops_refuses_to_start_without_a_token_or_with_a_short_one_with_one_line(redis_url: str) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("OPS_")}
    env["REDIS_URL"] = redis_url
    for token, says in (("", "OPS_TOKEN is required"), ("short", "OPS_TOKEN: must be at least 32")):
        run = run_command("ops", env={**env, "OPS_TOKEN": token})
        assert run.returncode == 1
        [line] = run.stderr.strip().splitlines()
        assert says in line and "short" not in line  # the value itself is never printed


def test_the_settings_keep_the_token_out_of_their_repr_and_default_to_loopback_8081() -> None:
    settings = Settings.from_env({"OPS_TOKEN": TOKEN})
    assert TOKEN not in repr(settings)
    assert (settings.ops_host, settings.ops_port) == ("127.0.0.1", 8081)


async def test_every_api_endpoint_without_credentials_is_401_json_and_every_page_redirects_to_login(
    ops: Any,
) -> None:
    for path in GETS:
        answer = await ops.get(path)
        assert answer.status == 401, path
        assert (await answer.json())["error"] == "unauthorized"
    for path in POSTS:
        answer = await ops.post(path)
        assert answer.status == 401, path
    for path in PAGES:
        answer = await ops.get(path, allow_redirects=False)
        assert answer.status == 303, path
        assert answer.headers["Location"].startswith("/login?next=")
    login = await ops.get("/login")
    assert login.status == 200 and "OPS_TOKEN" in await login.text()
    assert "default-src 'self'" in login.headers["Content-Security-Policy"]


async def test_a_wrong_bearer_token_is_refused_401_and_logged_without_the_token(
    ops: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    wrong = "x" * 40
    answer = await ops.get("/api/overview", headers={"Authorization": f"Bearer {wrong}"})
    assert answer.status == 401
    logged = capsys.readouterr()
    assert "ops sign-in refused" in logged.out + logged.err
    assert wrong not in logged.out + logged.err


async def test_a_wrong_token_at_the_sign_in_form_is_refused_and_sets_no_cookie(ops: Any) -> None:
    answer = await ops.post("/login", data={"token": "y" * 40}, allow_redirects=False)
    assert answer.status == 401 and COOKIE not in answer.cookies
    assert "not the console's token" in await answer.text()
    assert (await ops.get("/api/dlq")).status == 401


async def test_every_get_endpoint_answers_with_the_bearer_token(
    ops: Any, receiver: Any, rsa_key: Any
) -> None:
    await post_order(receiver, rsa_key, "ApiOrder00000001")
    await receiver.server.app[METRICS].minutes.flush(
        receiver.server.app[REDIS], receiver.server.app[RECEIVER_KEYS]
    )

    overview = await (await ops.get("/api/overview", headers=BEARER)).json()
    assert overview["queue_depth"] == 1 and overview["dead_letters"] == 0 and overview["retrying"] == 0
    assert overview["callbacks_last_hour"] == {"accepted": 1}
    assert len(overview["callbacks_per_minute"]) == 60
    assert overview["workers"] == [] and overview["reconcile"]["last_completed_window_end"] is None
    assert (await (await ops.get("/api/dlq", headers=BEARER)).json()) == []
    assert (await (await ops.get("/api/retrying", headers=BEARER)).json()) == []
    order = await (await ops.get("/api/orders/ApiOrder00000001", headers=BEARER)).json()
    assert order["order_id"] == "ApiOrder00000001"
    assert [u["state"] for u in order["updates"]] == ["queued"]
    by_number = await ops.get("/api/orders/n-ApiOrder00000001", headers=BEARER)
    assert await by_number.json() == order
    for path in PAGES[:2] + PAGES[3:]:
        assert (await ops.get(path, headers=BEARER)).status in (200, 404), path


async def test_an_unknown_order_or_dead_letter_is_404_with_a_json_reason(ops: Any) -> None:
    answer = await ops.get("/api/orders/NoSuchOrder", headers=BEARER)
    assert answer.status == 404 and "NoSuchOrder" in (await answer.json())["reason"]
    for path in POSTS:
        answer = await ops.post(path, headers=BEARER)
        assert answer.status == 404, path
        body = await answer.json()
        assert body["error"] == "not_found" and "not in the dead-letter queue" in body["reason"]
    answer = await ops.post("/api/retrying/Nope-0-order/retry-now", headers=BEARER)
    assert answer.status == 404 and "not waiting for a retry" in (await answer.json())["reason"]


async def test_the_api_lists_dead_letters_as_dlq_list_json_and_requeue_keeps_the_orders_sequence(
    ops: Any, receiver: Any, rsa_key: Any, sink: Sink, workers: Any, cli: Any, sync_redis: Any
) -> None:
    sink.answer = lambda update_id, n: (
        (422, {}, 0.0) if update_id.endswith("-0-order") and n == 1 else (200, {}, 0.0)
    )
    workers(**webhook_settings(sink))
    first, second = await post_order(receiver, rsa_key, "ApiGapOrder00001", ("order", "charge"))
    await wait_for(lambda: len(sink.attempts(second)) == 1, what="the later update, past the dead letter")

    listed = await (await ops.get("/api/dlq", headers=BEARER)).json()
    assert listed == json.loads(cli("dlq", "list", "--json")[1])
    assert [e["id"] for e in listed] == [first]
    assert (await (await ops.get("/api/dlq?q=nothing-like-it", headers=BEARER)).json()) == []
    assert len(await (await ops.get("/api/dlq?q=HTTP+422&newer=1h", headers=BEARER)).json()) == 1
    assert (await (await ops.get("/api/dlq?older=1h", headers=BEARER)).json()) == []
    assert (await ops.get("/api/dlq?older=soon", headers=BEARER)).status == 400

    answer = await ops.post(f"/api/dlq/{first}/requeue", headers=BEARER)
    assert answer.status == 200 and (await answer.json()) == {"id": first, "status": "requeued"}
    await wait_for(lambda: len(sink.attempts(first)) == 2, what="the requeued update")
    # as `dlq requeue` does: the same id, once more through the order's chain, after its head
    assert [r.update["event"]["sequence"] for r in sink.received] == [0, 1, 0]

    async def delivered() -> bool:
        order = await (await ops.get(f"/api/orders/{first}", headers=BEARER)).json()
        return bool([u["state"] for u in order["updates"]] == ["delivered", "delivered"])

    await eventually(delivered, what="both updates delivered in the story")
    order = await (await ops.get(f"/api/orders/{first}", headers=BEARER)).json()
    assert order["updates"][0]["queued_by"] == "requeue"
    assert (await ops.post(f"/api/dlq/{first}/requeue", headers=BEARER)).status == 404


async def test_purge_through_the_api_forgets_the_dead_letter_and_the_story_says_so(
    ops: Any, receiver: Any, rsa_key: Any, sink: Sink, workers: Any, sync_redis: Any
) -> None:
    sink.answer = lambda _id, _n: (400, {}, 0.0)
    workers(**webhook_settings(sink))
    update_id = await post_dead_lettered(receiver, rsa_key, sync_redis, "ApiPurgeOrder001")
    for page in ("/dlq", f"/dlq/{update_id}", f"/orders?key={update_id}"):
        shown = await ops.get(page, headers=BEARER)
        assert shown.status == 200 and update_id in await shown.text(), page
    overview = await (await ops.get("/", headers=BEARER)).text()
    assert '<b id="dlq-depth">1</b>' in overview
    answer = await ops.post(f"/api/dlq/{update_id}/purge", headers=BEARER)
    assert answer.status == 200 and (await answer.json())["status"] == "purged"
    assert sync_redis.hlen(RedisKeys().dead_letters) == 0
    order = await (await ops.get(f"/api/orders/{update_id}", headers=BEARER)).json()
    assert order["updates"][0]["purged_at"]
    assert (await ops.post(f"/api/dlq/{update_id}/purge", headers=BEARER)).status == 404


async def test_retrying_lists_the_update_with_its_error_and_retry_now_delivers_it_at_once(
    ops: Any, receiver: Any, rsa_key: Any, sink: Sink, workers: Any
) -> None:
    sink.answer = lambda _id, n: (503, {"Retry-After": "3600"}, 0.0) if n == 1 else (200, {}, 0.0)
    workers(**webhook_settings(sink))
    [update_id] = await post_order(receiver, rsa_key, "ApiRetryOrder001")

    async def listed() -> bool:
        found = await (await ops.get("/api/retrying", headers=BEARER)).json()
        return bool(found) and found[0]["last_error"] is not None

    await eventually(listed, what="the update waiting for its retry")
    [waiting] = await (await ops.get("/api/retrying", headers=BEARER)).json()
    assert waiting["id"] == update_id and waiting["attempts"] == 1
    assert waiting["due_in_seconds"] > 3000 and "503" in waiting["last_error"]
    overview = await (await ops.get("/api/overview", headers=BEARER)).json()
    assert overview["retrying"] == 1 and len(overview["workers"]) == 1

    await eventually(  # RQ records the retry (the job `scheduled`) just after the attempt
        lambda: _retry_now(ops, update_id), what="retry now accepted"
    )
    await wait_for(lambda: len(sink.attempts(update_id)) == 2, seconds=20, what="the retry, now")
    assert (await (await ops.get("/api/retrying", headers=BEARER)).json()) == []


async def _retry_now(ops: Any, update_id: str) -> bool:
    answer = await ops.post(f"/api/retrying/{update_id}/retry-now", headers=BEARER)
    return bool(answer.status == 200)


async def test_a_post_without_the_csrf_token_is_refused_403_and_changes_nothing(
    ops: Any, receiver: Any, rsa_key: Any, sink: Sink, workers: Any, sync_redis: Any
) -> None:
    sink.answer = lambda _id, _n: (400, {}, 0.0)
    workers(**webhook_settings(sink))
    update_id = await post_dead_lettered(receiver, rsa_key, sync_redis, "CsrfOrder0000001")
    csrf = await sign_in(ops)

    form = {"action": "purge", "confirm": "yes", "id": update_id}
    assert (await ops.post("/dlq/act", data=form, allow_redirects=False)).status == 403
    assert (await ops.post("/dlq/act", data={**form, "csrf": "0" * 64}, allow_redirects=False)).status == 403
    assert (await ops.post(f"/api/dlq/{update_id}/purge")).status == 403
    assert (await ops.post(f"/api/dlq/{update_id}/requeue")).status == 403
    assert sync_redis.hexists(RedisKeys().dead_letters, update_id)
    assert len(sink.attempts(update_id)) == 1

    # the session's own token does it (the form, or the header for the API)
    answer = await ops.post("/dlq/act", data={**form, "csrf": csrf}, allow_redirects=False)
    assert answer.status == 303 and answer.headers["Location"] == "/dlq?notice=purged&done=1&asked=1"
    assert "purged 1 of 1 update(s)" in await (await ops.get(answer.headers["Location"])).text()
    assert not sync_redis.hexists(RedisKeys().dead_letters, update_id)
    missing = await ops.post(f"/api/dlq/{update_id}/purge", headers={"X-CSRF-Token": csrf})
    assert missing.status == 404


async def test_a_session_cookie_opens_nothing_once_altered_signed_with_another_token_or_8_hours_old(
    ops: Any, settings: Settings, sync_redis: redis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    from receiver.ops.auth import SESSION_SECONDS, Authenticator

    csrf = await sign_in(ops)
    [cookie] = [c.value for c in ops.session.cookie_jar if c.key == COOKIE]
    ops.session.cookie_jar.clear()

    async def opens(value: str) -> bool:
        answer = await ops.get("/api/dlq", headers={"Cookie": f"{COOKIE}={value}"})
        assert answer.status in (200, 401)
        return answer.status == 200

    assert await opens(cookie)
    # a character of the signature changed (its first: the last one's low bits are base64 padding,
    # which decoding ignores)
    at = cookie.rindex(".") + 1
    flipped = cookie[:at] + ("A" if cookie[at] != "A" else "B") + cookie[at + 1 :]
    assert not await opens(flipped)
    other, _ = Authenticator("another-token-0123456789abcdefghijklmnop").new_session()
    assert not await opens(other)  # changing OPS_TOKEN signs everyone out
    # The CSRF token is the session's own and no other signature passes for it.
    purge = "/api/dlq/SomeOrder-0-order/purge"
    for wrong in (other, cookie, csrf[:-1]):
        answer = await ops.post(purge, headers={"Cookie": f"{COOKIE}={cookie}", "X-CSRF-Token": wrong})
        assert answer.status == 403
    answer = await ops.post(purge, headers={"Cookie": f"{COOKIE}={cookie}", "X-CSRF-Token": csrf})
    assert answer.status == 404  # past the guard: no such dead letter
    now = time.time()
    monkeypatch.setattr(time, "time", lambda: now + SESSION_SECONDS - 5)
    assert await opens(cookie)
    monkeypatch.setattr(time, "time", lambda: now + SESSION_SECONDS + 5)
    assert not await opens(cookie)


async def test_the_console_assets_are_served_without_sign_in_with_their_types_and_nothing_else_is(
    ops: Any,
) -> None:
    from receiver.ops.app import STATIC_FOLDER

    for name, kind in (("ops.css", "text/css"), ("ops.js", "javascript")):
        answer = await ops.get(f"/static/{name}")
        assert answer.status == 200 and kind in answer.headers["Content-Type"]
        assert await answer.read() == (STATIC_FOLDER / name).read_bytes()
        assert answer.headers["X-Content-Type-Options"] == "nosniff"
        assert answer.headers["Cache-Control"] == "no-store"
    for path in (
        "/static/",
        "/static/missing.css",
        "/static/../app.py",
        "/static/%2e%2e/app.py",
        "/static/..%2fapp.py",
    ):
        answer = await ops.get(path, allow_redirects=False)
        assert answer.status in (303, 403, 404), path  # 303: to sign-in, for a path the client cleaned
        assert b"import" not in await answer.read(), path
    for raw in (
        b"/static/../app.py",
        b"/static/%2e%2e/app.py",
        b"/static/..%2fapp.py",
        b"/static/./../auth.py",
    ):
        reader, writer = await asyncio.open_connection(ops.host, ops.port)
        writer.write(b"GET " + raw + b" HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        answer = await reader.read()
        writer.close()
        assert answer.split(b" ")[1] in (b"303", b"403", b"404") and b"import" not in answer, raw


async def test_a_one_time_sign_in_link_works_once(ops: Any, sync_redis: Any) -> None:
    link = make_sign_in_link(sync_redis, RedisKeys(), "")
    first = await ops.get(link, allow_redirects=False)
    assert first.status == 200 and COOKIE in first.cookies
    assert (await ops.get("/api/dlq")).status == 200  # the session cookie is kept by the client
    ops.session.cookie_jar.clear()
    again = await ops.get(link, allow_redirects=False)
    assert again.status == 401 and COOKIE not in again.cookies


async def test_sign_in_never_follows_next_off_the_site(ops: Any) -> None:
    for target in ("//evil.example/", "https://evil.example/", "/\\evil.example"):
        answer = await ops.post("/login", data={"token": TOKEN, "next": target}, allow_redirects=False)
        assert answer.headers["Location"] == "/", target


def test_the_docs_show_a_screenshot_of_each_page_the_browser_test_takes() -> None:
    console = (ROOT / "docs" / "ops-console.md").read_text()
    for page in ("login", "overview", "dlq", "dlq-paged", "dlq-entry", "confirm", "order", "retrying"):
        assert f"(images/ops-{page}.png)" in console, page
        assert (ROOT / "docs" / "images" / f"ops-{page}.png").stat().st_size > 10_000, page


async def test_all_matching_the_filter_are_listed_for_confirmation_and_only_they_are_purged(
    ops: Any, receiver: Any, rsa_key: Any, sink: Sink, workers: Any, sync_redis: Any
) -> None:
    sink.answer = lambda _id, _n: (400, {}, 0.0)
    workers(**webhook_settings(sink))
    [keep] = await post_order(receiver, rsa_key, "KeepThisOrder001")
    [drop] = await post_order(receiver, rsa_key, "DropThisOrder001")
    await wait_for(lambda: sync_redis.hlen(RedisKeys().dead_letters) == 2, what="both dead letters")
    csrf = await sign_in(ops)
    page = await (await ops.get("/dlq?q=dropthis&newer=1h")).text()
    assert drop in page and keep not in page

    filter_ = {"q": "dropthis", "older": "", "newer": "1h", "csrf": csrf, "action": "purge"}
    confirm = await ops.post("/dlq/confirm?scope=matching", data=filter_)
    text = await confirm.text()
    assert confirm.status == 200 and f"<code>{drop}</code>" in text and keep not in text
    assert 'name="scope" value="matching"' in text and 'name="q" value="dropthis"' in text
    assert 'name="id"' not in text  # the filter goes on, not the ids
    assert sync_redis.hlen(RedisKeys().dead_letters) == 2  # nothing done before the confirmation

    answer = await ops.post(
        "/dlq/act",
        data={"csrf": csrf, "action": "purge", "confirm": "yes", "scope": "matching", "q": "dropthis",
              "newer": "1h"},
        allow_redirects=False,
    )  # fmt: skip
    assert answer.status == 303
    went = urlsplit(answer.headers["Location"])
    assert (
        went.path == "/dlq" and {"q": ["dropthis"], "newer": ["1h"]}.items() <= parse_qs(went.query).items()
    )
    assert parse_qs(went.query)["notice"] == ["purged-matching"]  # the filter stays; the notice is ours
    assert sync_redis.hkeys(RedisKeys().dead_letters) == [keep.encode()]
    selected = await ops.post("/dlq/confirm", data={"csrf": csrf, "action": "requeue", "id": keep})
    assert f'name="id" value="{keep}"' in await selected.text()


def test_retry_now_queues_a_scheduled_retry_makes_a_started_one_due_and_drops_any_other(
    sync_redis: redis.Redis,
) -> None:
    from receiver.retries import RetrySchedule

    keys = RedisKeys()
    schedule = RetrySchedule(sync_redis, keys)
    for update_id, status in (("A-0-order", "scheduled"), ("B-0-order", "started"), ("C-0-order", "queued")):
        sync_redis.zadd(keys.retry_schedule, {update_id: time.time() + 3600})
        sync_redis.zadd(keys.rq_scheduled, {update_id: time.time() + 3600})
        sync_redis.hset(keys.rq_job(update_id), "status", status)
    assert schedule.retry_now("A-0-order")
    assert sync_redis.lrange(keys.rq_queue, 0, -1) == [b"A-0-order"]
    assert sync_redis.hget(keys.rq_job("A-0-order"), "status") == b"queued"
    assert sync_redis.zscore(keys.retry_schedule, "A-0-order") is None
    assert sync_redis.zscore(keys.rq_scheduled, "A-0-order") is None

    assert schedule.retry_now("B-0-order")
    assert (sync_redis.zscore(keys.retry_schedule, "B-0-order") or 0) <= time.time()
    assert sync_redis.hget(keys.rq_job("B-0-order"), "status") == b"started"

    assert not schedule.retry_now("C-0-order")
    assert sync_redis.zscore(keys.retry_schedule, "C-0-order") is None
    assert not schedule.retry_now("Nobody-0-order")
    assert sync_redis.lrange(keys.rq_queue, 0, -1) == [b"A-0-order"]


async def test_nothing_the_console_shows_holds_a_secret_or_a_card_token(
    aiohttp_client: Any, make_settings: Any, sync_redis: redis.Redis, receiver: Any, rsa_key: Any
) -> None:
    from tests.sink import SECRET

    settings = make_settings(ops_token=TOKEN, merchant_webhook_url="http://127.0.0.1:9/hooks",
                             merchant_webhook_secret=SECRET, intergiro_api_key="api-key-kept-secret")  # fmt: skip
    ops = await aiohttp_client(create_ops_app(settings, redis=sync_redis))
    [update_id] = await post_order(receiver, rsa_key, "SecretsOrder0001")
    keys = RedisKeys()
    update = json.loads(sync_redis.hget(keys.pending_updates, update_id) or b"{}")  # as the worker has it
    entry = {"id": update_id, "order_id": "SecretsOrder0001", "update": update, "attempts": 1,
             "last_error": "merchant answered HTTP 400", "last_error_at": "2026-01-01T00:00:00Z",
             "dead_lettered_at": "2026-01-01T00:00:00Z"}  # fmt: skip
    sync_redis.hset(keys.dead_letters, update_id, json.dumps(entry))
    shown = ""
    for path in ("/", "/dlq", f"/dlq/{update_id}", "/retrying", "/orders?key=SecretsOrder0001", *GETS):
        shown += await (await ops.get(path, headers=BEARER)).text()
    shown += await (await ops.get("/api/orders/SecretsOrder0001", headers=BEARER)).text()
    assert "SecretsOrder0001" in shown and '"last4":"1111"' in shown  # the entry's update, in full
    card_token = "c2VjcmV0LWNhcmQtdG9rZW4"  # the middle of the order's payment.card (tests/helpers.py)
    for secret in (TOKEN, SECRET, "api-key-kept-secret", card_token):
        assert secret not in shown, secret


async def test_the_overview_says_the_reconcile_window_is_periodic_reconciles_and_counts_one_shot_runs(
    ops: Any, sync_redis: Any
) -> None:
    keys = RedisKeys()
    sync_redis.hset(keys.metrics, "intergiro_reconcile_runs_total|outcome=completed", 1)  # a one-shot run
    page = await (await ops.get("/", headers=BEARER)).text()
    assert "No periodic reconcile (<code>reconcile --every</code>) has completed a window yet" in page
    assert "runs, one-shot ones included: completed 1" in page


async def test_the_overviews_pause_resume_and_retry_all_buttons_show_what_they_did(ops: Any) -> None:
    """Each button's answer is a notice in the console's own words, on the page it sends the browser to."""
    csrf = await sign_in(ops)
    for path, location, text in (
        ("/destinations/merchant/pause", "/?notice=paused&id=merchant", "merchant: paused"),
        ("/destinations/merchant/pause", "/?notice=already-paused&id=merchant", "merchant: already paused"),
        ("/destinations/merchant/resume", "/?notice=resumed&id=merchant", "merchant: resumed"),
        (
            "/destinations/merchant/resume",
            "/?notice=already-delivering&id=merchant",
            "merchant: already delivering",
        ),
        ("/retrying/retry-now", "/retrying?notice=made-due&done=0", "0 retrying update(s) made due now"),
    ):
        answer = await ops.post(path, data={"csrf": csrf, "reason": "deploy"}, allow_redirects=False)
        assert (answer.status, answer.headers["Location"]) == (303, location)
        shown = await (await ops.get(location)).text()
        assert f'<p class="notice" role="status">{text}</p>' in shown

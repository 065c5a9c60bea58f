"""The ops console: pages for people and a JSON API for scripts, behind one sign-in (receiver/ops/auth.py).

Its own process (`intergiro-receiver ops`) on OPS_HOST:OPS_PORT, never the callback port. It reads and
acts through the product's own modules: `trace` (receiver/history.py), the dead-letter queue
(receiver/deadletters.py) and the retry schedule (receiver/chains.py), on a sync Redis client whose
calls run in a thread, off the event loop. Every action is logged with the operator's way in and the id.
"""

from __future__ import annotations

import asyncio
import functools
import secrets
import time
from collections.abc import Awaitable, Callable
from importlib import resources
from typing import Any, TypeVar
from urllib.parse import quote, urlencode

import jinja2
import orjson
from aiohttp import web
from redis import Redis
from redis.exceptions import RedisError

from receiver.app import stop_signal
from receiver.chains import OrderChains
from receiver.connections import sync_redis
from receiver.deadletters import DeadLetters
from receiver.destination_state import DestinationState, describe, format_age, retry_all_now
from receiver.errors import CommandError
from receiver.history import render, trace
from receiver.logs import log
from receiver.ops import state
from receiver.ops.auth import Authenticator, Session, set_session_cookie
from receiver.reconcile import parse_duration
from receiver.rediskeys import RedisKeys, destination_keys
from receiver.settings import Settings

SETTINGS = web.AppKey("settings", Settings)
REDIS = web.AppKey("redis", Redis)
KEYS = web.AppKey("keys", RedisKeys)
DESTINATION_KEYS = web.AppKey("destination_keys", list[RedisKeys])
AUTH = web.AppKey("auth", Authenticator)
TEMPLATES = web.AppKey("templates", jinja2.Environment)
SESSION = web.RequestKey("session", Session)
VIA = web.RequestKey("via", str)  # how the request signed in: "session" or "bearer"
SIGN_IN_LINK_SECONDS = 600
ACTIONS = ("requeue", "purge")
T = TypeVar("T")

# Pages are the product's own: scripts, styles and images from this process only; never framed.
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data:; frame-ancestors 'none'; "
    "form-action 'self'; base-uri 'none'",
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}
PUBLIC = ("/login", "/static/", "/healthz")


def json_response(body: Any, status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(body), status=status, content_type="application/json")


def see_other(location: str) -> web.Response:
    return web.Response(status=303, headers={"Location": location})


def api_error(status: int, error: str, reason: str) -> web.Response:
    return json_response({"error": error, "reason": reason}, status)


async def in_thread(request: web.Request, work: Callable[..., T], *args: Any) -> T:
    """Run a Redis-bound function off the event loop; Redis down becomes 503."""
    try:
        return await asyncio.to_thread(work, *args)
    except RedisError:
        raise web.HTTPServiceUnavailable(text="redis not reachable", headers={"Retry-After": "5"}) from None


# --- sign-in ----------------------------------------------------------------------------------------


@web.middleware
async def signed_in(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """Every route but /login and the assets needs the bearer token or a session; every POST with a
    session also needs its CSRF token (a form field, or the X-CSRF-Token header for the API)."""
    try:
        response = await _signed_in(request, handler)
    except web.HTTPException as exc:  # 400, 404, 503 raised below get the headers too
        exc.headers.update(SECURITY_HEADERS)
        raise
    response.headers.update(SECURITY_HEADERS)
    return response


async def _signed_in(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    if request.path.startswith(PUBLIC):
        return await handler(request)
    auth = request.app[AUTH]
    api = request.path.startswith("/api/")
    if "Authorization" in request.headers:
        if not auth.bearer_matches(request):
            await auth.refuse(request, "bearer token")
            return api_error(401, "unauthorized", "wrong bearer token")
        request[VIA] = "bearer"
        return await handler(request)
    session = auth.session(request)
    if session is None:
        if api:
            return api_error(
                401, "unauthorized", "send Authorization: Bearer <OPS_TOKEN>, or sign in at /login"
            )
        target = request.path_qs if request.method == "GET" else "/"
        return see_other("/login?" + urlencode({"next": target}))
    request[SESSION] = session
    request[VIA] = "session"
    if request.method == "POST":
        given = request.headers.get("X-CSRF-Token", "")
        if not given and not api:
            given = str((await request.post()).get("csrf", ""))
        if not auth.csrf_matches(session, given):
            log.warning(
                "ops request refused: CSRF token missing or wrong", path=request.path, remote=request.remote
            )
            if api:
                return api_error(
                    403, "forbidden", "CSRF token missing or wrong (send X-CSRF-Token, or the bearer token)"
                )
            return web.Response(status=403, text="403: CSRF token missing or wrong; nothing was changed")
    return await handler(request)


def _safe_next(target: str) -> str:
    """Only a path of this site (never `//host` or a URL) is followed after sign-in."""
    return target if target.startswith("/") and not target.startswith("//") and "\\" not in target else "/"


async def login_page(request: web.Request) -> web.Response:
    return page(request, "login.html", next=_safe_next(request.query.get("next", "/")), failed=False)


async def login(request: web.Request) -> web.StreamResponse:
    form = await request.post()
    auth = request.app[AUTH]
    target = _safe_next(str(form.get("next", "/")))
    if not auth.token_matches(str(form.get("token", ""))):
        await auth.refuse(request, "sign-in form")
        return page(request, "login.html", next=target, failed=True, status=401)
    return _start_session(request, see_other(target), "sign-in form")


def _start_session(request: web.Request, response: web.StreamResponse, how: str) -> web.StreamResponse:
    cookie, _ = request.app[AUTH].new_session()
    set_session_cookie(request, response, cookie)
    log.info("ops signed in", how=how, remote=request.remote)
    return response


async def login_link(request: web.Request) -> web.StreamResponse:
    """A one-time sign-in link (`dev` prints one): good once, for SIGN_IN_LINK_SECONDS."""
    keys = request.app[KEYS]
    nonce = request.match_info["nonce"]
    used = await in_thread(request, request.app[REDIS].getdel, keys.ops_sign_in_link(nonce))
    if used is None:
        await request.app[AUTH].refuse(request, "sign-in link")
        return page(request, "login.html", next="/", failed=True, status=401)
    # A page, not a redirect: a SameSite=Strict cookie set by a link followed from outside (a terminal)
    # is sent by the next navigation this page starts, not by a redirect of that first one.
    return _start_session(request, page(request, "signed_in.html"), "one-time link")


async def logout(request: web.Request) -> web.StreamResponse:
    response = see_other("/login")
    response.del_cookie("igr_ops_session", path="/")
    return response


def make_sign_in_link(redis: Redis, keys: RedisKeys, base_url: str) -> str:
    """Store a one-time sign-in link's nonce and return the link (for `dev`)."""
    nonce = secrets.token_urlsafe(24)
    redis.set(keys.ops_sign_in_link(nonce), "1", ex=SIGN_IN_LINK_SECONDS)
    return f"{base_url}/login/link/{nonce}"


# --- pages ------------------------------------------------------------------------------------------


def page(request: web.Request, name: str, status: int = 200, **context: Any) -> web.Response:
    session = request.get(SESSION)
    csrf = request.app[AUTH].csrf_token(session) if session else ""
    text = request.app[TEMPLATES].get_template(name).render(
        csrf=csrf, path=request.path, signed_in=session is not None, notice=request.query.get("notice"),
        **context,
    )  # fmt: skip
    return web.Response(text=text, status=status, content_type="text/html")


async def overview_page(request: web.Request) -> web.Response:
    keys = request.app[KEYS]
    data = await in_thread(
        request, state.overview, request.app[REDIS], keys, None, request.app[DESTINATION_KEYS]
    )
    rows = await in_thread(request, describe, request.app[REDIS], request.app[DESTINATION_KEYS])
    peak = max([sum(m["counts"].values()) for m in data["callbacks_per_minute"]] + [1])
    return page(request, "overview.html", o=data, peak=peak, destinations=rows, format_age=format_age)


def _destination_state(request: web.Request) -> DestinationState | None:
    name = request.match_info["name"]
    found = next((k for k in request.app[DESTINATION_KEYS] if k.destination == name), None)
    return None if found is None else DestinationState(request.app[REDIS], found)


def _pause_or_resume(request: web.Request, destination: DestinationState, action: str, reason: str) -> bool:
    by = f"ops:{request[VIA]}"
    log.info("ops: " + action, action=action, destination=destination.keys.destination, via=request[VIA],
             remote=request.remote)  # fmt: skip
    return destination.pause(reason, by) if action == "pause" else destination.resume(by)


def _destination_action(action: str, api: bool) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
    """POST /destinations/{name}/pause|resume (the overview's buttons) and its /api/ twin; a pause's
    reason is the form's or the JSON body's `reason`."""

    async def act(request: web.Request) -> web.StreamResponse:
        destination = _destination_state(request)
        name = request.match_info["name"]
        if destination is None:
            if api:
                return api_error(404, "not_found", f"no destination {name!r} is configured")
            raise web.HTTPNotFound()
        reason = ""
        if action == "pause":
            if api and request.can_read_body:
                try:
                    body = orjson.loads(await request.read())
                except orjson.JSONDecodeError:
                    return api_error(400, "bad_body", 'the body must be JSON: {"reason": "..."}')
                reason = str(body.get("reason", "")) if isinstance(body, dict) else ""
            elif not api:
                reason = str((await request.post()).get("reason", ""))
        changed = await in_thread(request, _pause_or_resume, request, destination, action, reason)
        done = "paused" if action == "pause" else "resumed"
        if api:
            rows = await in_thread(request, describe, request.app[REDIS], [destination.keys])
            return json_response({**rows[0], "changed": changed})
        notice = (
            f"{name}: {done}" if changed else f"{name}: already {done if action == 'pause' else 'delivering'}"
        )
        return see_other("/?" + urlencode({"notice": notice}))

    return act


def _filter(query: Any) -> tuple[str, int | None, int | None, str | None]:
    """The dead-letter filter of a query or form: text, older-than and newer-than seconds, a problem."""
    text = str(query.get("q", "")).strip()
    durations: list[int | None] = []
    problem = None
    for name in ("older", "newer"):
        raw = str(query.get(name, "")).strip()
        try:
            durations.append(parse_duration(raw) if raw else None)
        except ValueError:
            durations.append(None)
            problem = f"{name}: use a number with s, m, h, d or w (e.g. 30m, 2h, 3d)"
    return text, durations[0], durations[1], problem


def _matching(redis: Redis, keys: RedisKeys, query: Any) -> tuple[list[dict[str, Any]], str | None]:
    text, older, newer, problem = _filter(query)
    now = time.time()
    entries = DeadLetters(redis, keys).entries()
    return [e for e in entries if state.matches(e, text, older, newer, now)], problem


async def dlq_page(request: web.Request) -> web.Response:
    app = request.app
    entries, problem = await in_thread(request, _matching, app[REDIS], app[KEYS], request.query)
    q = {k: request.query.get(k, "") for k in ("q", "older", "newer")}
    return page(request, "dlq.html", entries=entries, problem=problem, q=q, filtered=any(q.values()))


async def dlq_entry_page(request: web.Request) -> web.Response:
    app = request.app
    update_id = request.match_info["id"]
    entry = await in_thread(request, DeadLetters(app[REDIS], app[KEYS]).get, update_id)
    if entry is None:
        return page(request, "missing.html", what=f"{update_id} is not in the dead-letter queue", status=404)
    pretty = orjson.dumps(entry["update"], option=orjson.OPT_INDENT_2).decode()
    return page(request, "dlq_entry.html", e=entry, pretty=pretty)


async def dlq_confirm(request: web.Request) -> web.Response:
    """The confirmation step of every dead-letter action: what will be done to which updates."""
    app = request.app
    form = await request.post()
    action = str(form.get("action", ""))
    if action not in ACTIONS:
        raise web.HTTPBadRequest(text="action: requeue or purge")
    if request.query.get("scope") == "matching":
        entries, problem = await in_thread(request, _matching, app[REDIS], app[KEYS], form)
        if problem:
            raise web.HTTPBadRequest(text=problem)
        ids = [e["id"] for e in entries]
    else:
        ids = [str(i) for i in form.getall("id", [])]
    return page(request, "confirm.html", action=action, ids=ids)


async def dlq_act(request: web.Request) -> web.StreamResponse:
    form = await request.post()
    action = str(form.get("action", ""))
    if action not in ACTIONS or form.get("confirm") != "yes":
        raise web.HTTPBadRequest(text="confirm the action first")
    ids = [str(i) for i in form.getall("id", [])]
    done = await in_thread(request, _act, request, action, ids)
    notice = (
        f"{action}d {done} of {len(ids)} update(s)"
        if action == "purge"
        else f"requeued {done} of {len(ids)} update(s)"
    )
    return see_other("/dlq?" + urlencode({"notice": notice}))


def _act(request: web.Request, action: str, ids: list[str]) -> int:
    """Requeue or purge each update, logging each one done (the order's history records it too)."""
    app = request.app
    dlq = DeadLetters(app[REDIS], app[KEYS], app[SETTINGS].history_retention_seconds)
    done = 0
    for update_id in ids:
        if (dlq.requeue if action == "requeue" else dlq.purge)(update_id):
            done += 1
            log.info(
                f"ops: dead letter {action}d",
                action=action,
                update=update_id,
                via=request[VIA],
                remote=request.remote,
            )
    return done


async def order_page(request: web.Request) -> web.Response:
    app = request.app
    key = request.query.get("key", "").strip()
    documents = await in_thread(request, trace, app[REDIS], app[KEYS], key) if key else []
    stories = [(d, render(d)) for d in documents]
    status = 404 if key and not documents else 200
    return page(request, "order.html", key=key, stories=stories, status=status,
                retention=app[SETTINGS].history_retention_seconds)  # fmt: skip


async def retrying_page(request: web.Request) -> web.Response:
    app = request.app
    updates = await in_thread(
        request, state.retrying, app[REDIS], app[KEYS], None, 1000, app[DESTINATION_KEYS]
    )
    return page(request, "retrying.html", updates=updates)


async def retry_now_form(request: web.Request) -> web.StreamResponse:
    update_id = request.match_info["id"]
    moved = await in_thread(request, _retry_now, request, update_id)
    notice = f"{update_id}: retrying now" if moved else f"{update_id} is not waiting for a retry"
    return see_other("/retrying?" + urlencode({"notice": notice}))


def _retry_now(request: web.Request, update_id: str) -> bool:
    app = request.app
    # RETRY_NOW answers 0 for an update not in that destination's schedule: the first that has it acts
    moved = any(OrderChains(app[REDIS], keys).retry_now(update_id) for keys in app[DESTINATION_KEYS])
    if moved:
        log.info(
            "ops: retry now", action="retry_now", update=update_id, via=request[VIA], remote=request.remote
        )
    return moved


# --- JSON API ---------------------------------------------------------------------------------------


async def api_overview(request: web.Request) -> web.Response:
    app = request.app
    return json_response(
        await in_thread(request, state.overview, app[REDIS], app[KEYS], None, app[DESTINATION_KEYS])
    )


async def api_destinations(request: web.Request) -> web.Response:
    """Every destination as `destination list --json` prints it."""
    return json_response(
        await in_thread(request, describe, request.app[REDIS], request.app[DESTINATION_KEYS])
    )


async def api_dlq(request: web.Request) -> web.Response:
    """The entries as `dlq list --json` prints them; `q`, `older`, `newer` filter as the page does."""
    app = request.app
    entries, problem = await in_thread(request, _matching, app[REDIS], app[KEYS], request.query)
    if problem:
        return api_error(400, "bad_filter", problem)
    return json_response(entries)


def _api_action(action: str) -> Callable[[web.Request], Awaitable[web.Response]]:
    async def act(request: web.Request) -> web.Response:
        update_id = request.match_info["id"]
        done = await in_thread(request, _act, request, action, [update_id])
        if not done:
            return api_error(404, "not_found", f"{update_id} is not in the dead-letter queue")
        return json_response({"id": update_id, "status": f"{action}d" if action == "purge" else "requeued"})

    return act


async def api_order(request: web.Request) -> web.Response:
    """The document `trace --json` prints (a list when the key names several orders)."""
    app = request.app
    key = request.match_info["key"]
    documents = await in_thread(request, trace, app[REDIS], app[KEYS], key)
    if not documents:
        return api_error(404, "not_found", f"nothing is known of {key!r}")
    return json_response(documents[0] if len(documents) == 1 else documents)


async def api_retrying(request: web.Request) -> web.Response:
    app = request.app
    return json_response(
        await in_thread(request, state.retrying, app[REDIS], app[KEYS], None, 1000, app[DESTINATION_KEYS])
    )


async def api_retry_now(request: web.Request) -> web.Response:
    update_id = request.match_info["id"]
    if not await in_thread(request, _retry_now, request, update_id):
        return api_error(404, "not_found", f"{update_id} is not waiting for a retry")
    return json_response({"id": update_id, "status": "retrying"})


async def api_retry_all_now(request: web.Request) -> web.Response:
    """Every retrying update due now (`?destination=NAME`: only that destination's):
    {"made_due": {destination: count}}."""
    each = request.app[DESTINATION_KEYS]
    name = request.query.get("destination")
    if name is not None:
        each = [k for k in each if k.destination == name]
        if not each:
            return api_error(404, "not_found", f"no destination {name!r} is configured")
    by = f"ops:{request[VIA]}"
    return json_response({"made_due": await in_thread(request, retry_all_now, request.app[REDIS], each, by)})


async def retry_all_now_form(request: web.Request) -> web.StreamResponse:
    made = await in_thread(
        request, retry_all_now, request.app[REDIS], request.app[DESTINATION_KEYS], f"ops:{request[VIA]}"
    )
    notice = f"{sum(made.values())} retrying update(s) made due now"
    return see_other("/retrying?" + urlencode({"notice": notice}))


async def healthz(request: web.Request) -> web.Response:
    return json_response({"status": "ok"})


async def static(request: web.Request) -> web.Response:
    name = request.match_info["name"]
    if name not in STATIC_TYPES:
        raise web.HTTPNotFound()
    body = resources.files("receiver.ops").joinpath("static", name).read_bytes()
    return web.Response(body=body, content_type=STATIC_TYPES[name], headers={"Cache-Control": "max-age=3600"})


STATIC_TYPES = {"ops.css": "text/css", "ops.js": "text/javascript"}


@functools.cache
def templates() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.PackageLoader("receiver.ops", "templates"),
        autoescape=True,  # every value is escaped: errors and order fields come from outside
    )
    env.filters["urlquote"] = lambda text: quote(str(text), safe="")
    return env


def create_ops_app(
    settings: Settings, redis: Redis | None = None, failure_delay: float | None = None
) -> web.Application:
    """The console's aiohttp application (`redis`: a client to use instead of one made from settings)."""
    app = web.Application(middlewares=[signed_in], client_max_size=1024 * 1024)
    app[SETTINGS] = settings
    app[KEYS] = RedisKeys(settings.redis_key_prefix, settings.queue_name)
    app[DESTINATION_KEYS] = destination_keys(app[KEYS], [d.name for d in settings.destinations])
    app[AUTH] = (
        Authenticator(settings.ops_token)
        if failure_delay is None
        else Authenticator(settings.ops_token, failure_delay)
    )
    app[TEMPLATES] = templates()
    app[REDIS] = redis if redis is not None else sync_redis(settings, timeout=10)
    if redis is None:

        async def close(app: web.Application) -> None:
            app[REDIS].close()

        app.on_cleanup.append(close)
    r = app.router
    r.add_get("/login", login_page)
    r.add_post("/login", login)
    r.add_get("/login/link/{nonce}", login_link)
    r.add_post("/logout", logout)
    r.add_get("/static/{name}", static)
    r.add_get("/healthz", healthz)
    r.add_get("/", overview_page)
    r.add_get("/dlq", dlq_page)
    r.add_get("/dlq/{id}", dlq_entry_page)
    r.add_post("/dlq/confirm", dlq_confirm)
    r.add_post("/dlq/act", dlq_act)
    r.add_get("/orders", order_page)
    r.add_get("/retrying", retrying_page)
    r.add_post("/retrying/{id}/retry-now", retry_now_form)
    r.add_get("/api/overview", api_overview)
    r.add_get("/api/destinations", api_destinations)
    for action in ("pause", "resume"):
        r.add_post(f"/destinations/{{name}}/{action}", _destination_action(action, api=False))
        r.add_post(f"/api/destinations/{{name}}/{action}", _destination_action(action, api=True))
    r.add_get("/api/dlq", api_dlq)
    for action in ACTIONS:
        r.add_post(f"/api/dlq/{{id}}/{action}", _api_action(action))
    r.add_get("/api/orders/{key}", api_order)
    r.add_get("/api/retrying", api_retrying)
    r.add_post("/retrying/retry-now", retry_all_now_form)
    r.add_post("/api/retrying/retry-now", api_retry_all_now)
    r.add_post("/api/retrying/{id}/retry-now", api_retry_now)
    return app


def run_ops(settings: Settings) -> int:
    """`intergiro-receiver ops`: serve the console until SIGTERM or SIGINT."""
    if not settings.ops_token:
        raise CommandError(
            "OPS_TOKEN is required (at least 32 characters; e.g. "
            '`python3 -c "import secrets; print(secrets.token_urlsafe(32))"`)'
        )
    log.info("ops console starting", host=settings.ops_host, port=settings.ops_port)
    asyncio.run(_serve(settings))
    return 0


async def _serve(settings: Settings) -> None:
    runner = web.AppRunner(create_ops_app(settings), handle_signals=False, access_log=None)
    await runner.setup()
    stop = stop_signal()
    try:
        await web.TCPSite(runner, settings.ops_host, settings.ops_port).start()
        await stop.wait()
    finally:
        await runner.cleanup()

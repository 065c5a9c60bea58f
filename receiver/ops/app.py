"""The ops console: pages for people and a JSON API for scripts, behind one sign-in (receiver/ops/auth.py).

Its own process (`intergiro-receiver ops`) on OPS_HOST:OPS_PORT, never the callback port. It reads and
acts through the product's own modules: `trace` (receiver/history.py), the dead-letter queue
(receiver/deadletters.py) and the retry schedule (receiver/chains.py), on a sync Redis client whose
calls run in a thread, off the event loop. Every action is logged with the operator's way in and the id.
"""

from __future__ import annotations

import asyncio
import functools
import re
import secrets
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import quote, urlencode

import jinja2
import orjson
from aiohttp import web
from redis import Redis
from redis.exceptions import RedisError

from receiver import __version__
from receiver.connections import sync_redis
from receiver.deadletters import SORTS as DEAD_LETTER_SORTS
from receiver.deadletters import DeadLetterFilter, DeadLetters, DestinationNotConfigured, http_status
from receiver.destination_state import DestinationState, describe, format_age, retry_all_now
from receiver.errors import CommandError
from receiver.history import render
from receiver.logs import log
from receiver.ops import state
from receiver.ops.auth import COOKIE, Authenticator, Session, set_session_cookie
from receiver.reconcile import parse_duration
from receiver.rediskeys import RedisKeys, configured_destination_keys
from receiver.retries import RetrySchedule
from receiver.settings import Settings
from receiver.supervisor import stop_signal
from receiver.trace import trace

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
STATIC_FOLDER = Path(__file__).with_name("static")  # package data: ops.css, ops.js


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


async def read_form(request: web.Request) -> Any:
    """The request's form; 400 when its bytes are not text in its charset (aiohttp raises then)."""
    try:
        return await request.post()
    except (UnicodeDecodeError, LookupError, ValueError):
        raise web.HTTPBadRequest(text="400: the form is not readable text; nothing was changed") from None


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
        if auth.locked_for():  # checked before the token: a guess in the lockout learns nothing
            return _locked_out(request, api_error(429, "too_many_requests", LOCKED_OUT))
        if not auth.bearer_matches(request):
            auth.refuse(request, "bearer token")
            return api_error(401, "unauthorized", "wrong bearer token")
        request[VIA] = "bearer"
        return await handler(request)
    session = auth.session(request)
    if session is not None and await in_thread(request, _ended, request.app, session):
        session = None
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
            given = str((await read_form(request)).get("csrf", ""))
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


LOCKED_OUT = "a wrong token was sent a moment ago; no token is checked until Retry-After has passed"


def _locked_out(request: web.Request, response: web.Response) -> web.Response:
    """A sign-in answered 429 during the lockout, its token not looked at."""
    response.set_status(429)
    response.headers["Retry-After"] = request.app[AUTH].retry_after()
    return response


def _ended(app: web.Application, session: Session) -> bool:
    """Whether the session was ended by signing out (see `logout`)."""
    return bool(app[REDIS].exists(app[KEYS].ops_session_ended(session.nonce)))


def _safe_next(target: str) -> str:
    """Only a path of this site is followed after sign-in: printable ASCII (browsers drop a tab or a
    newline, so `/\t/host` would be `//host`), starting with one `/`, no backslash (read as `/`)."""
    same_site = (
        target.startswith("/")
        and not target.startswith("//")
        and all(0x21 <= ord(c) <= 0x7E and c != "\\" for c in target)
    )
    return target if same_site else "/"


# The notices a page shows are the console's own sentences: the URL names one by its code and gives
# only the numbers and the update id it holds, so a link from outside cannot put its text in the box.
NOTICES = {
    "purged": "purged {done} of {asked} update(s)",
    "requeued": "requeued {done} of {asked} update(s)",
    "requeued-some": "requeued {done} of {asked} update(s); {refused} not: their destination is no longer configured",
    "purged-matching": "purged {done} dead letter(s) matching the filter",
    "requeued-matching": "requeued {done} dead letter(s) matching the filter",
    "retrying": "{id}: retrying now",
    "not-retrying": "{id} is not waiting for a retry",
    "made-due": "{done} retrying update(s) made due now",
    "paused": "{id}: paused",
    "resumed": "{id}: resumed",
    "already-paused": "{id}: already paused",
    "already-delivering": "{id}: already delivering",
}
_NOTICE_ID = re.compile(r"[A-Za-z0-9_-]{1,100}")
_NOTICE_COUNT = re.compile(r"[0-9]{1,7}")


def notice_link(path: str, code: str, **values: Any) -> str:
    """Where an action sends the browser to show its notice `code` (one of NOTICES)."""
    return f"{path}?{urlencode({'notice': code, **values})}"


def notice_text(query: Any) -> str | None:
    """The notice a page's URL names, in the console's own words; None for any other text."""
    template = NOTICES.get(str(query.get("notice", "")))
    if template is None:
        return None
    checks = {"done": _NOTICE_COUNT, "asked": _NOTICE_COUNT, "refused": _NOTICE_COUNT, "id": _NOTICE_ID}
    values = {name: str(query.get(name, "")) for name in checks}
    if any("{" + name + "}" in template and not checks[name].fullmatch(v) for name, v in values.items()):
        return None
    return template.format(**values)


async def login_page(request: web.Request) -> web.Response:
    return page(request, "login.html", next=_safe_next(request.query.get("next", "/")), failed=False)


async def login(request: web.Request) -> web.StreamResponse:
    auth = request.app[AUTH]
    try:
        form = await read_form(request)
    except web.HTTPBadRequest:  # a token that is no text is a wrong token
        if auth.locked_for():
            return _locked_out(request, page(request, "login.html", next="/", failed=False, locked=True))
        auth.refuse(request, "sign-in form")
        return page(request, "login.html", next="/", failed=True, status=401)
    target = _safe_next(str(form.get("next", "/")))
    if auth.locked_for():  # checked before the token: a guess in the lockout learns nothing
        return _locked_out(request, page(request, "login.html", next=target, failed=False, locked=True))
    if not auth.token_matches(str(form.get("token", ""))):
        auth.refuse(request, "sign-in form")
        return page(request, "login.html", next=target, failed=True, status=401)
    return _start_session(request, see_other(target), "sign-in form")


def _start_session(request: web.Request, response: web.StreamResponse, how: str) -> web.StreamResponse:
    cookie, _ = request.app[AUTH].new_session()
    set_session_cookie(request, response, cookie, request.app[SETTINGS].ops_trust_forwarded_proto)
    log.info("ops signed in", how=how, remote=request.remote)
    return response


async def login_link(request: web.Request) -> web.StreamResponse:
    """A one-time sign-in link (`dev` prints one): good once, for SIGN_IN_LINK_SECONDS."""
    keys = request.app[KEYS]
    nonce = request.match_info["nonce"]
    if request.app[AUTH].locked_for():
        return _locked_out(request, page(request, "login.html", next="/", failed=False, locked=True))
    used = await in_thread(request, request.app[REDIS].getdel, keys.ops_sign_in_link(nonce))
    if used is None:
        request.app[AUTH].refuse(request, "sign-in link")
        return page(request, "login.html", next="/", failed=True, status=401)
    # A page, not a redirect: a SameSite=Strict cookie set by a link followed from outside (a terminal)
    # is sent by the next navigation this page starts, not by a redirect of that first one.
    return _start_session(request, page(request, "signed_in.html"), "one-time link")


async def logout(request: web.Request) -> web.StreamResponse:
    """End the session on the server (remembered as ended until it would have expired), not only in
    this browser: the cookie, copied or kept, opens nothing any more. Other sessions go on."""
    session = request.get(SESSION)
    if session is not None:
        await in_thread(request, _end, request.app, session)
        log.info("ops signed out", remote=request.remote)
    response = see_other("/login")
    response.del_cookie(COOKIE, path="/")
    return response


def _end(app: web.Application, session: Session) -> None:
    ttl = max(1, session.expires - int(time.time()) + 1)
    app[REDIS].set(app[KEYS].ops_session_ended(session.nonce), "1", ex=ttl)


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
        csrf=csrf, path=request.path, signed_in=session is not None, notice=notice_text(request.query),
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
        code = done if changed else ("already-paused" if action == "pause" else "already-delivering")
        return see_other(notice_link("/", code, id=name))

    return act


FILTER_FIELDS = ("q", "destination", "status", "older", "newer")
LIST_FIELDS = (*FILTER_FIELDS, "sort", "dir", "per")
# A selection is one page at most (the largest page size): a form of ids stays far below aiohttp's 1000
# fields. More is "all matching", which sends the filter, not the ids.
MAX_SELECTED = max(state.PAGE_SIZES)
CONFIRM_IDS_SHOWN = 20


def _filter(query: Any) -> tuple[DeadLetterFilter, str | None]:
    """The dead-letter filter of a query or form (q, destination, status, older, newer), and what of
    it cannot be used (left out of the filter)."""
    problems = []
    ages: dict[str, int | None] = {}
    for name in ("older", "newer"):
        raw = str(query.get(name, "")).strip()
        try:
            ages[f"{name}_than"] = parse_duration(raw) if raw else None
        except ValueError:
            ages[f"{name}_than"] = None
            problems.append(f"{name}: use a number with s, m, h, d or w (e.g. 30m, 2h, 3d)")
    text = str(query.get("q", "")).strip()
    destination = str(query.get("destination", "")).strip() or None
    status = str(query.get("status", "")).strip().lower()
    try:
        chosen = DeadLetterFilter(destination, text, status, **ages)
    except ValueError as exc:
        problems.append(str(exc))
        chosen = DeadLetterFilter(destination, text, "", **ages)
    return chosen, "; ".join(problems) or None


def _paging(query: Any, soonest_first: bool = False) -> state.Paging:
    """Page, size and order of a list page's query (`page`, `per`, `sort`, `dir=asc`; for the retrying
    updates, soonest first unless `dir=desc`)."""
    sort = str(query.get("sort", "time"))
    per, number = str(query.get("per", "")), str(query.get("page", ""))
    return state.Paging(
        number=max(1, int(number)) if number.isdigit() and len(number) < 9 else 1,
        size=int(per) if per.isdigit() and int(per) in state.PAGE_SIZES else 50,
        sort=sort if sort in DEAD_LETTER_SORTS else "time",
        ascending=query.get("dir") != "desc" if soonest_first else query.get("dir") == "asc",
    )


def _kept(source: Any, fields: tuple[str, ...] = LIST_FIELDS) -> dict[str, str]:
    """The list fields set in a query or form, to carry into the next URL (filters survive actions)."""
    kept = {k: str(source.get(k, "")).strip() for k in fields}
    return {k: v for k, v in kept.items() if v}


def _linker(path: str, current: dict[str, str]) -> Callable[..., str]:
    """For a template: this list's URL with some fields changed (paging, sorting, a filter cleared)."""

    def link(**changes: Any) -> str:
        fields = {k: str(v) for k, v in {**current, **changes}.items() if v not in ("", None)}
        return path + ("?" + urlencode(fields) if fields else "")

    return link


async def dlq_page(request: web.Request) -> web.Response:
    app = request.app
    chosen, problem = _filter(request.query)
    paging = _paging(request.query)
    listing = await in_thread(request, state.dead_letter_page, app[REDIS], app[KEYS], chosen, paging)
    current = _kept(request.query)
    return page(
        request, "dlq.html", listing=listing, entries=listing["entries"], problem=problem, paging=paging,
        q={k: request.query.get(k, "") for k in LIST_FIELDS}, filtered=bool(chosen.described()),
        link=_linker("/dlq", current), sizes=state.PAGE_SIZES, kept=current,
        destinations=[d.name for d in app[SETTINGS].destinations],
    )  # fmt: skip


def _attempts_of(redis: Redis, keys: RedisKeys, entry: dict[str, Any]) -> list[dict[str, Any]]:
    """The attempts of a dead letter's delivery, as its order's history keeps them (what the merchant
    answered each time), oldest first."""
    destination = entry.get("destination")
    for document in trace(redis, keys, entry["order_id"]):
        for update in document["updates"]:
            if update["id"] == entry["update"]["id"]:
                return [
                    a for a in update["attempts"]
                    if (a["target"] or "").partition(":")[0] == destination or (not destination and ":" not in (a["target"] or ""))
                ]  # fmt: skip
    return []


async def dlq_entry_page(request: web.Request) -> web.Response:
    app = request.app
    update_id = request.match_info["id"]
    entry = await in_thread(request, DeadLetters(app[REDIS], app[KEYS]).get, update_id)
    if entry is None:
        return page(request, "missing.html", what=f"{update_id} is not in the dead-letter queue", status=404)
    pretty = orjson.dumps(entry["update"], option=orjson.OPT_INDENT_2).decode()
    attempts = await in_thread(request, _attempts_of, app[REDIS], app[KEYS], entry)
    return page(request, "dlq_entry.html", e=entry, pretty=pretty, status_of=http_status, attempts=attempts)


def _selected(form: Any) -> list[str]:
    ids = [str(i) for i in form.getall("id", [])]
    if len(ids) > MAX_SELECTED:
        raise web.HTTPBadRequest(text=f"select at most {MAX_SELECTED} (a page); for more, use all matching")
    return ids


def _first_matching(redis: Redis, keys: RedisKeys, chosen: DeadLetterFilter) -> tuple[int, list[str]]:
    """How many dead letters `chosen` matches, and the newest CONFIRM_IDS_SHOWN of their ids."""
    found = list(DeadLetters(redis, keys).matching(chosen))
    found.sort(key=DEAD_LETTER_SORTS["time"], reverse=True)
    return len(found), [e["id"] for e in found[:CONFIRM_IDS_SHOWN]]


async def dlq_confirm(request: web.Request) -> web.Response:
    """The confirmation step of every dead-letter action: what will be done to which updates (for all
    matching: how many, the newest few, and the filter, which the action sends on)."""
    app = request.app
    form = await read_form(request)
    action = str(form.get("action", ""))
    if action not in ACTIONS:
        raise web.HTTPBadRequest(text="action: requeue or purge")
    kept = _kept(form)
    if request.query.get("scope") == "matching":
        chosen, problem = _filter(form)
        if problem:
            raise web.HTTPBadRequest(text=problem)
        count, ids = await in_thread(request, _first_matching, app[REDIS], app[KEYS], chosen)
        return page(request, "confirm.html", action=action, scope="matching", count=count, ids=ids,
                    described=chosen.described(), kept=kept, back=_linker("/dlq", kept)())  # fmt: skip
    ids = _selected(form)
    return page(request, "confirm.html", action=action, scope="selected", count=len(ids), ids=ids,
                described={}, kept=kept, back=_linker("/dlq", kept)())  # fmt: skip


async def dlq_act(request: web.Request) -> web.StreamResponse:
    form = await read_form(request)
    action = str(form.get("action", ""))
    if action not in ACTIONS or form.get("confirm") != "yes":
        raise web.HTTPBadRequest(text="confirm the action first")
    code = "purged" if action == "purge" else "requeued"
    if form.get("scope") == "matching":
        chosen, problem = _filter(form)
        if problem:
            raise web.HTTPBadRequest(text=problem)
        done = await in_thread(request, _act_matching, request, action, chosen)
        return see_other(notice_link("/dlq", f"{code}-matching", done=done, **_kept(form)))
    ids = _selected(form)
    done, refused = await in_thread(request, _act, request, action, ids)
    if refused:
        return see_other(
            notice_link(
                "/dlq", "requeued-some", done=done, asked=len(ids), refused=len(refused), **_kept(form)
            )
        )
    return see_other(notice_link("/dlq", code, done=done, asked=len(ids), **_kept(form)))


def _act(request: web.Request, action: str, ids: list[str]) -> tuple[int, list[str]]:
    """Requeue or purge each update, logging each one done (the order's history records it too);
    (how many were done, why each requeue refused was refused). An id that is not a dead letter is
    left as it is."""
    app = request.app
    settings = app[SETTINGS]
    configured = [d.name for d in settings.destinations]
    dlq = DeadLetters(app[REDIS], app[KEYS], settings.history_retention_seconds, configured)
    done = 0
    refused: list[str] = []
    for update_id in ids:
        try:
            acted = (dlq.requeue if action == "requeue" else dlq.purge)(update_id)
        except DestinationNotConfigured as exc:
            refused.append(str(exc))
            log.warning("ops: dead letter not requeued", reason=str(exc), update=update_id, via=request[VIA])
            continue
        if acted:
            done += 1
            log.info(
                f"ops: dead letter {action}d",
                action=action,
                update=update_id,
                via=request[VIA],
                remote=request.remote,
            )
    return done, refused


def _act_matching(request: web.Request, action: str, chosen: DeadLetterFilter) -> int:
    """Requeue (those for a configured destination) or purge every dead letter `chosen` matches, in
    batches; one log line says what, with the filter (each order's history records each update)."""
    app = request.app
    dlq = DeadLetters(app[REDIS], app[KEYS], app[SETTINGS].history_retention_seconds)
    configured = {d.name for d in app[SETTINGS].destinations}
    done = dlq.apply(action, chosen, configured if action == "requeue" else None)
    log.info(
        f"ops: dead letters {action}d by filter",
        action=action,
        filter=chosen.described(),
        count=done,
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


def _retrying_listing(request: web.Request) -> tuple[dict[str, Any], state.Paging]:
    """The page of retrying updates a query asks for (`destination`, `page`, `per`, `sort`, `dir`),
    soonest first unless sorted otherwise."""
    app = request.app
    paging = _paging(request.query, soonest_first=True)
    destination = request.query.get("destination") or None
    each = [k for k in app[DESTINATION_KEYS] if destination in (None, k.destination)]
    return state.retrying_page(app[REDIS], each, paging), paging


async def retrying_page(request: web.Request) -> web.Response:
    app = request.app
    listing, paging = await in_thread(request, _retrying_listing, request)
    current = _kept(request.query, RETRYING_FIELDS)
    return page(request, "retrying.html", listing=listing, updates=listing["updates"], paging=paging,
                link=_linker("/retrying", current), destination=request.query.get("destination", ""),
                destinations=[d.name for d in app[SETTINGS].destinations], sizes=state.PAGE_SIZES,
                kept=current)  # fmt: skip


# What of the Retrying page's URL its forms carry, so the page an action returns to is the one it left.
RETRYING_FIELDS = ("destination", "per", "sort", "dir", "page")


async def retry_now_form(request: web.Request) -> web.StreamResponse:
    update_id = request.match_info["id"]
    kept = _kept(await read_form(request), RETRYING_FIELDS)
    moved = await in_thread(request, _retry_now, request, update_id)
    return see_other(notice_link("/retrying", "retrying" if moved else "not-retrying", id=update_id, **kept))


def _retry_now(request: web.Request, update_id: str) -> bool:
    app = request.app
    # RETRY_NOW answers 0 for an update not in that destination's schedule: the first that has it acts
    moved = any(RetrySchedule(app[REDIS], keys).retry_now(update_id) for keys in app[DESTINATION_KEYS])
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
    """The entries as `dlq list --json` prints them, oldest first; `q`, `destination`, `status`,
    `older`, `newer` filter as the page does."""
    app = request.app
    chosen, problem = _filter(request.query)
    if problem:
        return api_error(400, "bad_filter", problem)
    entries = await in_thread(request, lambda: list(DeadLetters(app[REDIS], app[KEYS]).matching(chosen)))
    return json_response(sorted(entries, key=DEAD_LETTER_SORTS["time"]))


def _api_bulk(action: str) -> Callable[[web.Request], Awaitable[web.Response]]:
    """POST /api/dlq/requeue|purge: the action on every dead letter the JSON body's filter matches."""

    async def act(request: web.Request) -> web.Response:
        try:
            chosen = DeadLetterFilter.from_json(orjson.loads(await request.read()))
        except ValueError as exc:  # orjson's JSONDecodeError is one
            return api_error(400, "bad_filter", f"{exc} (a JSON object; `{{}}` means every dead letter)")
        done = await in_thread(request, _act_matching, request, action, chosen)
        return json_response({"purged" if action == "purge" else "requeued": done})

    return act


def _api_action(action: str) -> Callable[[web.Request], Awaitable[web.Response]]:
    async def act(request: web.Request) -> web.Response:
        update_id = request.match_info["id"]
        done, refused = await in_thread(request, _act, request, action, [update_id])
        if refused:
            return api_error(409, "destination_not_configured", refused[0])
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
    """One page of the retrying updates, as the Retrying page's query asks (`destination`, `page`,
    `per`, `sort`, `dir`): a JSON list; `X-Total-Count` says how many wait, `Link` the next and
    previous pages."""
    listing, _ = await in_thread(request, _retrying_listing, request)
    response = json_response(listing["updates"])
    response.headers["X-Total-Count"] = str(listing["total"])
    current = _linker(request.path, _kept(request.query, ("destination", "per", "sort", "dir")))
    pages = {"next": listing["page"] + 1, "prev": listing["page"] - 1}
    links = [f'<{current(page=n)}>; rel="{rel}"' for rel, n in pages.items() if 1 <= n <= listing["pages"]]
    if links:
        response.headers["Link"] = ", ".join(links)
    return response


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
    """The Retrying page's "Retry all now": every retrying update of the destination it shows (of
    every destination when it shows all) made due now."""
    kept = _kept(await read_form(request), RETRYING_FIELDS)
    each = [k for k in request.app[DESTINATION_KEYS] if kept.get("destination") in (None, k.destination)]
    made = await in_thread(request, retry_all_now, request.app[REDIS], each, f"ops:{request[VIA]}")
    return see_other(notice_link("/retrying", "made-due", done=sum(made.values()), **kept))


async def healthz(request: web.Request) -> web.Response:
    return json_response({"status": "ok"})


@functools.cache
def templates() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.PackageLoader("receiver.ops", "templates"),
        autoescape=True,  # every value is escaped: errors and order fields come from outside
    )
    env.filters["urlquote"] = lambda text: quote(str(text), safe="")
    return env


def create_ops_app(
    settings: Settings, redis: Redis | None = None, lockout_seconds: float | None = None
) -> web.Application:
    """The console's aiohttp application (`redis`: a client to use instead of one made from settings;
    `lockout_seconds`: instead of SIGN_IN_LOCKOUT_SECONDS)."""
    app = web.Application(middlewares=[signed_in], client_max_size=1024 * 1024)
    app[SETTINGS] = settings
    app[KEYS] = RedisKeys.of(settings)
    app[DESTINATION_KEYS] = configured_destination_keys(settings)
    app[AUTH] = (
        Authenticator(settings.ops_token)
        if lockout_seconds is None
        else Authenticator(settings.ops_token, lockout_seconds)
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
    # The console's style sheet and script, served by aiohttp (no index, no symlinks out of the folder).
    r.add_static("/static/", STATIC_FOLDER, show_index=False, follow_symlinks=False)
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
        r.add_post(f"/api/dlq/{action}", _api_bulk(action))
    for action in ACTIONS:
        r.add_post(f"/api/dlq/{{id}}/{action}", _api_action(action))
    r.add_get("/api/orders/{key}", api_order)
    r.add_get("/api/retrying", api_retrying)
    r.add_post("/retrying/retry-now", retry_all_now_form)
    r.add_post("/api/retrying/retry-now", api_retry_all_now)
    r.add_post("/api/retrying/{id}/retry-now", api_retry_now)
    from receiver.ops import replaying  # its handlers use this module's; imported once this one is

    replaying.setup(app)
    return app


def run_ops(settings: Settings) -> int:
    """`intergiro-receiver ops`: serve the console until SIGTERM or SIGINT."""
    if not settings.ops_token:
        raise CommandError(
            "OPS_TOKEN is required (at least 32 characters; e.g. "
            '`python3 -c "import secrets; print(secrets.token_urlsafe(32))"`)'
        )
    log.info(
        "ops console starting",
        host=settings.ops_host,
        port=settings.ops_port,
        version=__version__,
        settings=settings.summary(),
    )
    asyncio.run(_serve(settings))
    log.info("ops console stopped")
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

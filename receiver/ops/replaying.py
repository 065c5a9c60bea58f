"""The console's replay of a window to one destination (receiver/replay.py, as `intergiro-receiver replay`
runs it): a form, a confirmation page with the dry run's counts, then the replay itself, run in the
background, and the destination's last replay (running, completed, failed) on its page and in the API.

The replay reads Intergiro's order list one day and page at a time, so a long window takes minutes: the
request that confirms it takes the destination's lock (one replay per destination, refused at once when
another holds it) and returns; a thread of this process runs the replay and frees the lock. The dry run
behind the confirmation page is read within its request (on a thread of its own, off the event loop):
it reads the same list, so the page takes as long as that list does.
"""

from __future__ import annotations

import asyncio
import functools
import threading
import time
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import orjson
from aiohttp import web
from redis.exceptions import LockError, RedisError
from redis.lock import Lock

from receiver.destinations import Destination
from receiver.logs import log
from receiver.ops.app import REDIS, SETTINGS, VIA, api_error, in_thread, json_response, page, read_form
from receiver.reconcile import Window
from receiver.replay import ReplaySummary, last_replay, replay, replay_lock, window_of

REPLAYS = web.AppKey("replays", set[asyncio.Future[None]])
STOP = web.AppKey("replay_stop", threading.Event)
# Replays and dry runs hold a thread for as long as the order list takes: their own threads, so that
# they never take all of the default executor's, which every page's Redis reads run on. One replay per
# destination runs at a time (the lock); dry runs beyond DRY_RUN_THREADS wait their turn.
THREADS = web.AppKey("replay_threads", ThreadPoolExecutor)
DRY_RUN_THREADS = web.AppKey("dry_run_threads", ThreadPoolExecutor)
DRY_RUNS_AT_ONCE = 2
ORDER_ID_CHARS = 200
API_FIELDS = {"since", "start", "end", "order", "dry_run"}


@dataclass(frozen=True)
class Asked:
    """What a form or a JSON body asks to replay: orders created in `window`, only `order` when given."""

    window: Window
    order: str | None

    @classmethod
    def of(cls, fields: Mapping[str, Any], app: web.Application) -> Asked:
        """ValueError says what cannot be used (a window over REPLAY_MAX_WINDOW_SECONDS included)."""
        text = {}
        for name in ("since", "start", "end", "order"):
            value = fields.get(name)
            if value is not None and not isinstance(value, str):
                raise ValueError(f"{name}: a string")
            text[name] = (value or "").strip() or None
        order = text["order"]
        if order is not None and (len(order) > ORDER_ID_CHARS or not order.isprintable()):
            raise ValueError(f"order: an order id of at most {ORDER_ID_CHARS} printable characters")
        window = window_of(text["since"], text["start"], text["end"], app[SETTINGS], time.time())
        return cls(window, order)

    def described(self) -> dict[str, str | None]:
        return {
            "start": self.window.start.isoformat(),
            "end": self.window.end.isoformat(),
            "order": self.order,
        }


def setup(app: web.Application) -> None:
    """The replay routes and the background runs' bookkeeping (stopped, and waited for, on shutdown)."""
    app[REPLAYS] = set()
    app[STOP] = threading.Event()
    app[THREADS] = ThreadPoolExecutor(max(1, len(app[SETTINGS].destinations)), thread_name_prefix="replay")
    app[DRY_RUN_THREADS] = ThreadPoolExecutor(DRY_RUNS_AT_ONCE, thread_name_prefix="replay-dry-run")
    app.on_shutdown.append(_stop_replays)
    r = app.router
    r.add_get("/destinations/{name}/replay", replay_page)
    r.add_post("/destinations/{name}/replay/confirm", replay_confirm)
    r.add_post("/destinations/{name}/replay", replay_form)
    r.add_get("/api/destinations/{name}/replay", api_last_replay)
    r.add_post("/api/destinations/{name}/replay", api_replay)


async def _stop_replays(app: web.Application) -> None:
    """A replay running when the console stops ends after the page it is on (recorded as failed: the
    rest of its window is not queued; run it again)."""
    app[STOP].set()
    if app[REPLAYS]:
        await asyncio.gather(*app[REPLAYS], return_exceptions=True)
    app[THREADS].shutdown(wait=False)  # nothing runs on it any more
    app[DRY_RUN_THREADS].shutdown(wait=False, cancel_futures=True)  # a dry run under way ends on its own


def _destination(request: web.Request) -> Destination:
    found = request.app[SETTINGS].destination(request.match_info["name"])
    if found is None:
        raise web.HTTPNotFound(text=f"404: no destination {request.match_info['name']!r} is configured")
    return found


NO_API_KEY = "INTERGIRO_API_KEY is not set: a replay reads Intergiro's order list with it"


def _running_already(name: str) -> str:
    return f"a replay to {name} is running already; try again when it ends"


async def _dry_run(request: web.Request, destination: Destination, asked: Asked) -> ReplaySummary:
    """The counts `replay --dry-run` prints: what would be queued, what would be left alone."""
    app = request.app
    work = functools.partial(replay, app[SETTINGS], destination, asked.window, asked.order, app[REDIS], True,
                             f"ops:{request[VIA]}")  # fmt: skip
    return await asyncio.get_running_loop().run_in_executor(app[DRY_RUN_THREADS], work)


async def _start(request: web.Request, destination: Destination, asked: Asked) -> bool:
    """Take the destination's replay lock and run the replay in the background; False when another
    replay holds the lock."""
    app = request.app
    lock = replay_lock(app[REDIS], app[SETTINGS], destination)
    if not await in_thread(request, lock.acquire):
        log.warning("ops: replay refused: one is running", destination=destination.name, via=request[VIA])
        return False
    who = {"via": request[VIA], "remote": request.remote}
    log.info("ops: replay started", action="replay", destination=destination.name, **asked.described(), **who)
    run = asyncio.get_running_loop().run_in_executor(app[THREADS], _run, app, destination, asked, lock, who)
    app[REPLAYS].add(run)
    run.add_done_callback(app[REPLAYS].discard)
    return True


def _run(
    app: web.Application, destination: Destination, asked: Asked, lock: Lock, who: dict[str, Any]
) -> None:
    try:
        summary = replay(
            app[SETTINGS], destination, asked.window, asked.order, app[REDIS], False, f"ops:{who['via']}",
            lock, app[STOP],
        )  # fmt: skip
        log.info("ops: replay ended", action="replay", destination=destination.name, queued=summary.queued,
                 orders=summary.orders_queued, left_alone=summary.skipped_pending, errors=summary.errors,
                 **asked.described(), **who)  # fmt: skip
    except Exception:  # a thread's failure is logged here or nowhere; the lock is freed below
        log.exception("ops: replay failed", destination=destination.name, **who)
    finally:
        try:
            lock.release()
        except (LockError, RedisError):  # expired (then another may hold it) or Redis gone: it lapses
            pass


# --- pages ------------------------------------------------------------------------------------------


async def replay_page(request: web.Request) -> web.Response:
    """The destination's replay form and its last replay."""
    destination = _destination(request)
    return await _form_page(request, destination, {}, None)


async def _form_page(
    request: web.Request,
    destination: Destination,
    fields: Mapping[str, Any],
    problem: str | None,
    status: int = 200,
) -> web.Response:
    app = request.app
    last = await in_thread(request, last_replay, app[REDIS], app[SETTINGS], destination)
    return page(
        request, "replay.html", status=status, dest=destination.name, last=last, problem=problem,
        fields={k: str(fields.get(k, "")) for k in ("since", "start", "end", "order")},
        max_days=app[SETTINGS].replay_max_window_seconds // 86400, no_api_key=not app[SETTINGS].intergiro_api_key,
    )  # fmt: skip


async def _asked(request: web.Request, destination: Destination, form: Any) -> Asked | web.Response:
    """The window the form asks for, or the form again saying why there is none."""
    if not request.app[SETTINGS].intergiro_api_key:
        return await _form_page(request, destination, form, NO_API_KEY, status=409)
    try:
        return Asked.of(form, request.app)
    except ValueError as exc:
        return await _form_page(request, destination, form, str(exc), status=400)


async def replay_confirm(request: web.Request) -> web.Response:
    """POST (the form): the dry run's counts, and the button that replays exactly that window."""
    destination = _destination(request)
    form = await read_form(request)
    asked = await _asked(request, destination, form)
    if isinstance(asked, web.Response):
        return asked
    summary = await _dry_run(request, destination, asked)
    return page(request, "replay_confirm.html", dest=destination.name, asked=asked.described(), s=summary)


async def replay_form(request: web.Request) -> web.Response:
    """POST (the confirmation page's button): start the replay; its page shows it running, then done."""
    destination = _destination(request)
    form = await read_form(request)
    if form.get("confirm") != "yes":
        raise web.HTTPBadRequest(text="400: confirm the replay first; nothing was queued")
    asked = await _asked(request, destination, form)
    if isinstance(asked, web.Response):
        return asked
    if not await _start(request, destination, asked):
        return await _form_page(request, destination, form, _running_already(destination.name), status=409)
    raise web.HTTPSeeOther(f"/destinations/{destination.name}/replay")


# --- JSON API ---------------------------------------------------------------------------------------


async def api_replay(request: web.Request) -> web.Response:
    """POST /api/destinations/{name}/replay {"since": "1h"} or {"start", "end"}, optional "order" and
    "dry_run": the dry run's counts (200), or the replay started (202; GET the same path for its end)."""
    app = request.app
    name = request.match_info["name"]
    destination = app[SETTINGS].destination(name)
    if destination is None:
        return api_error(404, "not_found", f"no destination {name!r} is configured")
    try:
        body = orjson.loads(await request.read())
    except orjson.JSONDecodeError:
        body = None
    if (
        not isinstance(body, dict)
        or not set(body) <= API_FIELDS
        or not isinstance(body.get("dry_run", False), bool)
    ):
        return api_error(400, "bad_body", 'a JSON object: {"since": "1h"} or {"start": "YYYY-MM-DD", "end": '
                         '"YYYY-MM-DD"}, optional "order": "ID" and "dry_run": true')  # fmt: skip
    try:
        asked = Asked.of(body, app)
    except ValueError as exc:
        return api_error(400, "bad_window", str(exc))
    if not app[SETTINGS].intergiro_api_key:
        return api_error(409, "not_configured", NO_API_KEY)
    if body.get("dry_run"):
        summary = await _dry_run(request, destination, asked)
        if summary.errors:
            return json_response(
                {"error": "order_list_failed", "reason": summary.errors[-1], **summary.as_json()}, 502
            )
        return json_response(summary.as_json())
    if not await _start(request, destination, asked):
        return api_error(409, "replay_running", _running_already(name))
    started = {"destination": name, **asked.described(), "state": "running", "by": f"ops:{request[VIA]}"}
    answer = json_response(started, 202)
    answer.headers["Location"] = f"/api/destinations/{name}/replay"
    return answer


async def api_last_replay(request: web.Request) -> web.Response:
    """GET /api/destinations/{name}/replay: the destination's last replay (`state`: running, completed,
    failed, interrupted; its counts once it ended)."""
    app = request.app
    name = request.match_info["name"]
    destination = app[SETTINGS].destination(name)
    if destination is None:
        return api_error(404, "not_found", f"no destination {name!r} is configured")
    last = await in_thread(request, last_replay, app[REDIS], app[SETTINGS], destination)
    if last is None:
        return api_error(404, "not_found", f"no replay to {name} is recorded")
    return json_response(last)

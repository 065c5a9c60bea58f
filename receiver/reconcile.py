"""`intergiro-receiver reconcile`: find the order events whose callback never arrived, and queue them.

Intergiro's API lists the orders of a date window, each with its whole event list. Every listed order
goes through the very path of a callback (parse → one update per event → `Intake.store`, dedup and
enqueue in one atomic step), so an event a callback already brought is "known" and one it never
brought is queued now, with the id a callback would have given it. A rerun is always safe.

Periodic mode (`reconcile --every`) runs under a deployment-wide Redis lock and keeps a watermark
of the last completed window; see `PeriodicReconcile` for how the next window is chosen.
"""

from __future__ import annotations

import argparse
import asyncio
import re
import secrets
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from typing import Any

import orjson
from redis.asyncio import Redis
from redis.exceptions import LockNotOwnedError, RedisError

from receiver.clock import utc_now
from receiver.connections import async_redis
from receiver.errors import BadCallback, clip, report
from receiver.history import reconcile_note
from receiver.intake import Intake
from receiver.intergiro_api import ApiFailed, ApiRefused, OrderApi, RetryPolicy, new_session, order_id_of
from receiver.logs import log
from receiver.metrics.shared import count, set_gauge
from receiver.order import build_updates, event_key, parse_order
from receiver.rediskeys import RedisKeys
from receiver.rqstore import job_data
from receiver.settings import Settings
from receiver.supervisor import stop_signal
from receiver.verify import Unrepresentable, repair_unwritable

MAX_WINDOW_DAYS = 400
LOCK_TTL_MS = 60_000
_DURATION = re.compile(r"(\d+)([smhdw]?)")
_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}

# Outcomes of a run (the `outcome` label of intergiro_reconcile_runs_total).
COMPLETED = "completed"
API_FAILED = "api_failed"
REFUSED = "refused"
REDIS_FAILED = "redis_failed"
LOCK_LOST = "lock_lost"
BUSY = "busy"
NOT_DUE = "not_due"


def parse_duration(text: str) -> int:
    """`90`, `45s`, `30m`, `2h`, `3d`, `1w` → seconds (at least 1, at most MAX_WINDOW_DAYS)."""
    match = _DURATION.fullmatch(text.strip().lower())
    if not match:
        raise ValueError(f"--since {text!r}: use a number with s, m, h, d or w (e.g. 2h, 3d)")
    seconds = int(match[1]) * _UNITS[match[2]]
    if not 0 < seconds <= MAX_WINDOW_DAYS * 86400:
        raise ValueError(f"--since {text!r}: must be more than 0 and at most {MAX_WINDOW_DAYS} days")
    return seconds


def _utc_date(timestamp: float) -> date:
    return datetime.fromtimestamp(timestamp, UTC).date()


@dataclass(frozen=True)
class Window:
    """The order-creation dates to list, both ends included (UTC)."""

    start: date
    end: date

    @classmethod
    def since(cls, seconds: float, now: float) -> Window:
        return cls(_utc_date(now - seconds), _utc_date(now))

    @classmethod
    def between(cls, start: str, end: str) -> Window:
        try:
            window = cls(date.fromisoformat(start), date.fromisoformat(end))
        except ValueError:
            raise ValueError(f"--start {start!r} --end {end!r}: dates are YYYY-MM-DD") from None
        if window.end < window.start:
            raise ValueError("--end is before --start")
        if window.end > datetime.now(UTC).date() + timedelta(days=1):  # 9999-12-31 has no day after it
            raise ValueError(f"--end {end!r} is after tomorrow: no list holds orders created then")
        if len(window.days()) > MAX_WINDOW_DAYS:
            raise ValueError(f"the window is longer than {MAX_WINDOW_DAYS} days; reconcile it in parts")
        return window

    def days(self) -> list[date]:
        """One request per day: a long range in one request could be too large for the API to answer."""
        return [self.start + timedelta(days=n) for n in range((self.end - self.start).days + 1)]


@dataclass
class Summary:
    """What one run found; `missed` are the update ids queued now (or that a dry run would queue)."""

    window: Window
    dry_run: bool
    outcome: str = COMPLETED
    orders_listed: int = 0
    events_known: int = 0
    missed: list[str] = field(default_factory=list)
    malformed: list[str | None] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    def as_json(self) -> dict[str, Any]:
        return {
            "outcome": self.outcome,
            "window": {"start": self.window.start.isoformat(), "end": self.window.end.isoformat()},
            "dry_run": self.dry_run,
            "orders_listed": self.orders_listed,
            "events_known": self.events_known,
            "events_queued": 0 if self.dry_run else len(self.missed),
            "events_missed": len(self.missed),
            "missed": self.missed,
            "malformed_orders": len(self.malformed),
            "malformed_order_ids": self.malformed,
            "errors": self.errors,
        }

    def as_text(self) -> str:
        numbers = {
            "orders listed": self.orders_listed,
            "events already known": self.events_known,
            "events to queue (dry run)" if self.dry_run else "events queued now": len(self.missed),
            "malformed orders": len(self.malformed),
            "errors": len(self.errors),
        }
        rows = [f"reconcile {self.window.start} .. {self.window.end}: {self.outcome}"]
        rows += [f"  {label:<26}{value}" for label, value in numbers.items()]
        verb = "would queue" if self.dry_run else "queued"
        rows += [f"{verb} {update_id}" for update_id in self.missed]
        rows += [f"malformed order {order_id or '(no usable id)'}" for order_id in self.malformed]
        rows += [f"error {error}" for error in self.errors]
        return "\n".join(rows)


def listed_updates(raw: Any, received_at: str) -> tuple[Any, list[dict[str, Any]]]:
    """An order as Intergiro's order list gave it (trusted: a lone surrogate or a huge integer is
    repaired, not refused) and its updates; BadCallback, Unrepresentable or a parsing error otherwise."""
    order, repaired = repair_unwritable(raw)
    updates = build_updates(parse_order(order), received_at=received_at, verified_by="api", repaired=repaired)
    return order, updates


class Reconciler:
    """Lists a window's orders and runs each through the callback path (or, dry, only reads the dedup)."""

    def __init__(self, redis: Redis, settings: Settings, api: OrderApi, *, dry_run: bool = False) -> None:
        self.redis = redis
        self.keys = RedisKeys.of(settings)
        self.intake = Intake(
            redis,
            self.keys,
            settings.dedup_ttl_seconds,
            history_ttl=settings.history_retention_seconds,
            destinations=settings.destinations,
        )
        self.api = api
        self.dry_run = dry_run

    async def run(self, window: Window, keep_going: Callable[[], bool] = lambda: True) -> Summary:
        summary = Summary(window, self.dry_run)
        listed: set[str] = set()
        try:
            for day in window.days():
                async for page in self.api.pages(day):
                    if not keep_going():
                        summary.outcome = LOCK_LOST
                        summary.errors.append("the reconcile lock was lost; stopped")
                        return summary
                    queued_before = len(summary.missed)
                    scanned = 0
                    for raw in page:
                        order_id = order_id_of(raw)
                        if order_id is not None and order_id in listed:
                            continue  # a day window's edges may overlap; an order counts once
                        if order_id is not None:
                            listed.add(order_id)
                        scanned += 1
                        await self._reconcile_order(raw, summary)
                    summary.orders_listed += scanned
                    if not self.dry_run:
                        async with self.redis.pipeline(transaction=False) as pipe:
                            count(pipe, self.keys, "intergiro_reconcile_orders_scanned_total", scanned)
                            count(
                                pipe,
                                self.keys,
                                "intergiro_reconcile_missed_events_total",
                                len(summary.missed) - queued_before,
                            )
                            await pipe.execute()
        except ApiRefused as exc:
            summary.outcome, summary.errors = REFUSED, [*summary.errors, str(exc)]
        except ApiFailed as exc:
            summary.outcome, summary.errors = API_FAILED, [*summary.errors, str(exc)]
        except RedisError as exc:
            summary.outcome = REDIS_FAILED
            summary.errors.append(f"REDIS_URL: Redis not reachable ({type(exc).__name__})")
        return summary

    async def _reconcile_order(self, raw: Any, summary: Summary) -> None:
        """One listed order through the callback path; an order that cannot be read (or written as job
        data) is skipped, counted and logged by id, and the run goes on with the rest."""
        received_at = utc_now()
        order_id = order_id_of(raw)
        try:
            order, updates = listed_updates(raw, received_at)
            if self.dry_run:
                for update in updates:
                    job_data(update)  # what a real run would write: skipped alike when it cannot be
                missing = await self._unseen(updates)
            else:
                # job data is made before anything is sent
                missing = await self.intake.store(
                    updates, history=reconcile_note(received_at, order.get("number"))
                )
        except (BadCallback, Unrepresentable) as exc:
            summary.malformed.append(order_id)
            reason = exc.reason if isinstance(exc, BadCallback) else clip(str(exc))
            log.warning("malformed order in the order list; skipped", order=order_id, reason=reason)
            return
        except (TypeError, ValueError, KeyError, ArithmeticError, RecursionError) as exc:
            # parse_order should have refused it, or orjson cannot write it (a lone surrogate, an
            # integer beyond 64 bits): one odd order must still not stop the whole run
            summary.malformed.append(order_id)
            log.error("unreadable order in the order list; skipped", order=order_id, error=type(exc).__name__)
            return
        if missing and not self.dry_run:
            log.warning("reconcile queued missed events", order=updates[0]["order_id"], queued=missing)
        summary.missed += missing
        summary.events_known += len(updates) - len(missing)

    async def _unseen(self, updates: list[dict[str, Any]]) -> list[str]:
        """The ids of the updates whose event the dedup has not seen (what a real run would queue)."""
        fields = [event_key(u["event"]["sequence"], u["event"]["type"]) for u in updates]
        seen = await self.redis.hmget(self.keys.seen(updates[0]["order_id"]), fields)
        return [u["id"] for u, marker in zip(updates, seen, strict=True) if marker is None]


# The lock is one key holding a random token; only its holder may renew or release it, and only while
# it still holds it: GET and PEXPIRE/DEL must be one step, or a lock that expired and was taken by
# another process in between would be renewed or deleted from under that process.
# The watermark moves only under the lock and only forward: checking the token and writing the
# watermark in one step keeps a process that lost the lock from moving it.
WATERMARK_SCRIPT = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
local old = tonumber(redis.call('GET', KEYS[2]) or '0')
if tonumber(ARGV[2]) > old then redis.call('SET', KEYS[2], ARGV[2]) end
return 1
"""


class ReconcileLock:
    """One reconcile at a time across the deployment: redis-py's Lock (SET NX PX with a random token),
    its expiry renewed every third of it while held, so it lapses when its holder dies."""

    def __init__(self, redis: Redis, keys: RedisKeys, ttl_ms: int = LOCK_TTL_MS) -> None:
        self.redis = redis
        self.keys = keys
        self.ttl_ms = ttl_ms
        self.token = secrets.token_hex(16)  # ours, so that the watermark script can check it
        self.lost = False
        self._lock = redis.lock(
            keys.reconcile_lock, timeout=ttl_ms / 1000, blocking=False, thread_local=False
        )
        self._renewer: asyncio.Task[None] | None = None
        self._watermark = redis.register_script(WATERMARK_SCRIPT)

    async def acquire(self) -> bool:
        taken = bool(await self._lock.acquire(token=self.token))
        if taken:
            self.lost = False
            self._renewer = asyncio.create_task(self._renew_while_held())
        return taken

    async def _renew_while_held(self) -> None:
        while True:
            await asyncio.sleep(self.ttl_ms / 3000)
            try:
                await self._lock.reacquire()  # its expiry back to ttl_ms, if it is still ours
            except LockNotOwnedError:
                self.lost = True
                log.warning("reconcile lock lost")
                return
            except RedisError:
                continue  # try again; the lock stays ours until it expires

    async def advance_watermark(self, timestamp: float) -> bool:
        moved = await self._watermark(
            keys=[self.keys.reconcile_lock, self.keys.reconcile_watermark], args=[self.token, timestamp]
        )
        return bool(moved)

    async def release(self) -> None:
        if self._renewer is not None:
            self._renewer.cancel()
            self._renewer = None
        try:
            await self._lock.release()
        except RedisError:
            pass  # lapsed already (LockNotOwnedError), or Redis is away: it expires by itself


class PeriodicReconcile:
    """`reconcile --every`: one run per RECONCILE_INTERVAL_SECONDS across the whole deployment.

    Each run lists from min(watermark, now - lookback) to now (never more than MAX_WINDOW_DAYS back).
    The lookback is rescanned every time on purpose: the API lists orders by creation date, and an order
    created yesterday may get its charge or refund today, so "where we stopped" alone would miss those
    events. The watermark (end of the last completed window) only ever widens the window: after a
    downtime longer than the lookback, the next run starts where the last completed one ended, so the
    gap is covered; and any process that starts, or restarts, skips the run when the watermark says
    the deployment completed one less than an interval ago.
    """

    def __init__(
        self,
        redis: Redis,
        settings: Settings,
        api: OrderApi,
        *,
        lookback_seconds: float | None = None,
        clock: Callable[[], float] = time.time,
        lock_ttl_ms: int = LOCK_TTL_MS,
    ) -> None:
        self.redis = redis
        self.settings = settings
        self.keys = RedisKeys.of(settings)
        self.api = api
        self.interval = settings.reconcile_interval_seconds
        self.lookback = lookback_seconds or settings.reconcile_lookback_seconds
        self.clock = clock
        self.lock_ttl_ms = lock_ttl_ms
        self.last: Summary | None = None

    async def watermark(self) -> float | None:
        raw = await self.redis.get(self.keys.reconcile_watermark)
        return float(raw) if raw is not None else None

    async def tick(self) -> str:
        """One scheduled turn: BUSY (another process holds the lock), NOT_DUE, or the run's outcome."""
        lock = ReconcileLock(self.redis, self.keys, self.lock_ttl_ms)
        if not await lock.acquire():
            return BUSY
        try:
            now = self.clock()
            watermark = await self.watermark()
            if watermark is not None and now - watermark < self.interval:
                return NOT_DUE
            start = min(watermark if watermark is not None else now, now - self.lookback)
            start = max(start, now - MAX_WINDOW_DAYS * 86400)
            summary = await Reconciler(self.redis, self.settings, self.api).run(
                Window(_utc_date(start), _utc_date(now)), keep_going=lambda: not lock.lost
            )
            if summary.outcome == COMPLETED and not await lock.advance_watermark(now):
                summary.outcome = LOCK_LOST
            if summary.outcome == COMPLETED:
                await set_gauge(self.redis, self.keys, "intergiro_reconcile_watermark_timestamp_seconds", now)
            await count(self.redis, self.keys, "intergiro_reconcile_runs_total", outcome=summary.outcome)
            self.last = summary
            log.info(
                "reconcile run",
                **summary.as_json()
                | {"missed": summary.missed[:100], "malformed_order_ids": summary.malformed[:100]},
            )
            return summary.outcome
        finally:
            await lock.release()

    async def run_forever(self, stop: asyncio.Event) -> int:
        """Tick until `stop` is set; 1 when Intergiro refuses the key (it will not get better by itself)."""
        while not stop.is_set():
            try:
                outcome = await self.tick()
            except RedisError as exc:
                outcome = REDIS_FAILED
                log.warning("reconcile: Redis not reachable", error=type(exc).__name__)
            if outcome == REFUSED:
                report("reconcile", self.last.errors[-1] if self.last else REFUSED)
                return 1
            delay: float = self.interval
            if outcome in (COMPLETED, NOT_DUE):
                try:
                    watermark = await self.watermark()
                except RedisError:
                    watermark = None
                if watermark is not None:
                    delay = min(max(watermark + self.interval - self.clock(), 1.0), self.interval)
            try:
                await asyncio.wait_for(stop.wait(), timeout=delay)
            except TimeoutError:
                pass
        return 0


def _usage_error(message: str) -> int:
    report("reconcile", message)
    return 2


def _window(args: argparse.Namespace, settings: Settings, now: float) -> Window:
    if (args.start is None) != (args.end is None):
        raise ValueError("--start and --end go together")
    if args.start is not None:
        return Window.between(args.start, args.end)
    seconds = parse_duration(args.since) if args.since else settings.reconcile_lookback_seconds
    return Window.since(seconds, now)


async def reconcile_command(
    settings: Settings, args: argparse.Namespace, retry: RetryPolicy | None = None
) -> int:
    """The whole command, awaitable (tests call it on their own loop); returns the exit code."""
    if not settings.intergiro_api_key:
        report("reconcile", "INTERGIRO_API_KEY: required to list orders")
        return 2
    if args.every:
        if settings.reconcile_interval_seconds <= 0:
            return _usage_error("RECONCILE_INTERVAL_SECONDS: must be greater than 0 for --every")
        if args.start or args.end or args.dry_run:
            return _usage_error("--every takes no --start, --end or --dry-run (only --since)")
    try:
        window = _window(args, settings, time.time())
        lookback = parse_duration(args.since) if args.since else None
    except ValueError as exc:
        return _usage_error(str(exc))
    redis = async_redis(settings)
    try:
        async with new_session(settings) as session:
            api = OrderApi(session, settings, retry)
            if args.every:
                return await _run_periodic(PeriodicReconcile(redis, settings, api, lookback_seconds=lookback))
            summary = await Reconciler(redis, settings, api, dry_run=args.dry_run).run(window)
            if not args.dry_run and summary.outcome != REDIS_FAILED:
                try:
                    await count(
                        redis,
                        RedisKeys.of(settings),
                        "intergiro_reconcile_runs_total",
                        outcome=summary.outcome,
                    )
                except RedisError:
                    pass
    finally:
        await redis.aclose()
    if args.json:
        sys.stdout.write(orjson.dumps(summary.as_json()).decode() + "\n")
    else:
        print(summary.as_text())
    if summary.outcome != COMPLETED:
        report("reconcile", f"{summary.outcome}: {summary.errors[-1]}")
        return 1
    return 0


async def _run_periodic(periodic: PeriodicReconcile) -> int:
    stop = stop_signal()
    log.info("reconcile every", interval=periodic.interval, lookback=periodic.lookback)
    return await periodic.run_forever(stop)


def run_reconcile(settings: Settings, args: argparse.Namespace) -> int:
    return asyncio.run(reconcile_command(settings, args))

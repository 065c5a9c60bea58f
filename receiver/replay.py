"""`intergiro-receiver replay`: a window of updates sent again to one destination.

It rebuilds the window's updates from Intergiro's order list (as `reconcile` reads it: the same update
ids) and queues those the destination's filter passes into each order's chain for that destination
only (receiver.chains REPLAY): in each order's sequence, with the delivery's own job id (so the same
`webhook-id` and `Idempotency-Key`), marked as a replay (the history's attempt, the webhook's
`webhook-replay: 1` header), without reading or writing the dedup markers (no other destination sees
it, and it is no new event). An update the destination still has pending or dead-lettered is left as
it is. A replay is bounded (REPLAY_MAX_WINDOW_SECONDS) and one runs per destination at a time (a
redis-py Lock). A destination added later is backfilled the same way.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import orjson
from redis import Redis
from redis.exceptions import RedisError
from redis.lock import Lock

from receiver.chains import OrderChains
from receiver.clock import utc_now
from receiver.connections import sync_redis
from receiver.destinations import Destination
from receiver.errors import BadCallback, IntergiroReceiverError, report
from receiver.history import replay_note
from receiver.intergiro_api import ApiFailed, ApiRefused, OrderApi, new_session, order_id_of
from receiver.logs import log
from receiver.metrics.shared import count
from receiver.reconcile import Window, listed_updates, parse_duration
from receiver.rediskeys import RedisKeys
from receiver.settings import Settings
from receiver.verify import Unrepresentable

# How long one replay holds its destination's lock without renewing it (a replay of a long window
# renews it as it goes): a replay killed mid-way frees its destination within this.
LOCK_SECONDS = 300


@dataclass
class ReplaySummary:
    destination: str
    window: Window
    dry_run: bool
    orders_listed: int = 0
    updates_matching: int = 0
    queued: int = 0
    orders_queued: int = 0  # orders with at least one update queued (or that a dry run would queue)
    skipped_pending: int = 0  # still pending or dead-lettered for the destination: left as they are
    malformed: list[str | None] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    def as_json(self) -> dict[str, Any]:
        return {
            "destination": self.destination,
            "start": self.window.start.isoformat(),
            "end": self.window.end.isoformat(),
            "dry_run": self.dry_run,
            "orders_listed": self.orders_listed,
            "updates_matching": self.updates_matching,
            "queued" if not self.dry_run else "would_queue": self.queued,
            "orders_queued" if not self.dry_run else "orders_would_queue": self.orders_queued,
            "skipped_pending": self.skipped_pending,
            "malformed": self.malformed,
            "errors": self.errors,
        }

    def as_text(self) -> str:
        verb = "would queue" if self.dry_run else "queued"
        return (
            f"replay to {self.destination}, orders created {self.window.start} .. {self.window.end}:"
            f" {self.orders_listed} orders listed, {self.updates_matching} updates for {self.destination},"
            f" {verb} {self.queued} of {self.orders_queued} orders, {self.skipped_pending} still pending or dead-lettered (left as they are)"
            + (f", {len(self.malformed)} malformed orders skipped" if self.malformed else "")
        )


def window_of(
    since: str | None, start: str | None, end: str | None, settings: Settings, now: float
) -> Window:
    """The window asked for (`since` a duration, or `start` and `end` dates), within
    REPLAY_MAX_WINDOW_SECONDS; ValueError names what is wrong."""
    if (start is None) != (end is None):
        raise ValueError("--start and --end go together")
    if start is not None and end is not None:
        window = Window.between(start, end)
    elif since:
        seconds = parse_duration(since)
        if seconds > settings.replay_max_window_seconds:
            raise ValueError(
                f"--since {since}: longer than REPLAY_MAX_WINDOW_SECONDS ({settings.replay_max_window_seconds} s)"
            )
        window = Window.since(seconds, now)
    else:
        raise ValueError("give the window: --since DURATION, or --start DATE --end DATE")
    if len(window.days()) * 86400 > settings.replay_max_window_seconds + 86400:
        raise ValueError(
            f"the window is longer than REPLAY_MAX_WINDOW_SECONDS ({settings.replay_max_window_seconds} s)"
        )
    return window


class Replayer:
    """Lists a window's orders and queues their updates again for one destination."""

    def __init__(self, settings: Settings, destination: Destination, redis: Any, dry_run: bool) -> None:
        self.keys = keys_of(settings, destination)
        self.destination = destination
        self.redis = redis
        self.chains = OrderChains(redis, self.keys, settings.history_retention_seconds)
        self.dry_run = dry_run

    def order(self, raw: Any, only: str | None, summary: ReplaySummary) -> None:
        order_id = order_id_of(raw)
        if only is not None and order_id != only:
            return
        summary.orders_listed += 1
        try:
            _, updates = listed_updates(raw, utc_now())
        except (
            BadCallback,
            Unrepresentable,
            TypeError,
            ValueError,
            KeyError,
            ArithmeticError,
            RecursionError,
        ):
            summary.malformed.append(order_id)
            log.warning("malformed order in the order list; not replayed", order=order_id)
            return
        mine = [u for u in updates if self.destination.matches(u)]
        if not mine:
            return
        summary.updates_matching += len(mine)
        queued = self.chains.replay(
            mine, history=replay_note(utc_now(), self.destination.name), dry_run=self.dry_run
        )
        summary.queued += queued
        summary.orders_queued += 1 if queued else 0
        summary.skipped_pending += len(mine) - queued


def keys_of(settings: Settings, destination: Destination) -> RedisKeys:
    return RedisKeys.of(settings).for_destination(destination.name)


class Stopped(IntergiroReceiverError):
    """The replay was asked to stop (its process is stopping) before the end of its window."""


async def list_and_replay(
    settings: Settings,
    replayer: Replayer,
    window: Window,
    only: str | None,
    summary: ReplaySummary,
    lock: Lock | None,
    stop: threading.Event | None = None,
) -> None:
    async with new_session(settings) as session:
        api = OrderApi(session, settings)
        for day in window.days():
            async for page in api.pages(day):
                if stop is not None and stop.is_set():  # this page and the rest are not queued
                    raise Stopped("stopped before the end of the window: its process was stopping")
                for raw in page:
                    replayer.order(raw, only, summary)
                if lock is not None:
                    lock.extend(LOCK_SECONDS, replace_ttl=True)


def replay_lock(redis: Redis, settings: Settings, destination: Destination) -> Lock:
    """The destination's replay lock, not yet taken (any thread may release it: the console takes it in
    a request and releases it when its background run ends)."""
    lock: Lock = redis.lock(
        keys_of(settings, destination).replay_lock, timeout=LOCK_SECONDS, blocking=False, thread_local=False
    )
    return lock


def replay(
    settings: Settings,
    destination: Destination,
    window: Window,
    only: str | None,
    redis: Redis,
    dry_run: bool,
    by: str,
    lock: Lock | None = None,
    stop: threading.Event | None = None,
) -> ReplaySummary:
    """One replay to `destination`, or its dry run (which changes nothing); blocking (it runs its own
    event loop for Intergiro's order list). A real run must hold the destination's `lock` (renewed as it
    goes) and is recorded, asked and ended, for `last_replay`; `by` says who asked (`cli`, `ops:...`)."""
    summary = ReplaySummary(destination.name, window, dry_run)
    replayer = Replayer(settings, destination, redis, dry_run)
    asked = {"destination": destination.name, "start": window.start.isoformat(), "end": window.end.isoformat(),
             "order": only, "by": by, "started_at": utc_now()}  # fmt: skip
    try:
        if not dry_run:
            _record(redis, settings, replayer.keys, {**asked, "state": "running"})
        asyncio.run(list_and_replay(settings, replayer, window, only, summary, lock, stop))
    except (ApiRefused, ApiFailed, Stopped) as exc:
        summary.errors.append(str(exc))
    except RedisError as exc:
        summary.errors.append(f"REDIS_URL: Redis not reachable ({type(exc).__name__})")
    if not dry_run:
        try:
            if summary.queued:
                count(
                    redis,
                    replayer.keys,
                    "intergiro_replayed_updates_total",
                    summary.queued,
                    **destination.label,
                )
            ended = {"state": "failed" if summary.errors else "completed", "ended_at": utc_now()}
            _record(redis, settings, replayer.keys, {**asked, **summary.as_json(), **ended})
        except RedisError as exc:
            summary.errors.append(f"REDIS_URL: Redis not reachable ({type(exc).__name__})")
    log.info("replay", by=by, **summary.as_json())
    return summary


def _record(redis: Redis, settings: Settings, keys: RedisKeys, document: dict[str, Any]) -> None:
    # One small key per destination: kept as long as histories are, and for good when they are off (0).
    redis.set(keys.replay_last, orjson.dumps(document), ex=settings.history_retention_seconds or None)


def last_replay(redis: Redis, settings: Settings, destination: Destination) -> dict[str, Any] | None:
    """The destination's last replay as recorded (`state`: running, completed, failed, or interrupted
    when it says running but nothing holds the lock: its process ended mid-way); None when none is
    known."""
    keys = keys_of(settings, destination)
    with redis.pipeline(transaction=False) as pipe:
        pipe.get(keys.replay_last)
        pipe.exists(keys.replay_lock)
        raw, locked = pipe.execute()
    document: dict[str, Any] | None = orjson.loads(raw) if raw is not None else None
    running = document is not None and document.get("state") == "running"
    if locked and not running:  # taken a moment ago: the run has not recorded itself yet
        return {"destination": destination.name, "state": "running"}
    if running and not locked:
        return {**(document or {}), "state": "interrupted"}
    return document


def run_replay(settings: Settings, args: argparse.Namespace) -> int:
    """The whole command; returns its exit code (2: a usage error, 1: the replay failed or is running)."""
    destination = settings.destination(args.destination)
    if destination is None:
        configured = ", ".join(d.name for d in settings.destinations)
        report("replay", f"--destination {args.destination}: not a configured destination ({configured})")
        return 2
    if not settings.intergiro_api_key:
        report("replay", "INTERGIRO_API_KEY: required to list orders")
        return 2
    try:
        window = window_of(args.since, args.start, args.end, settings, time.time())
    except ValueError as exc:
        report("replay", str(exc))
        return 2
    redis = sync_redis(settings, timeout=10)
    lock = None
    try:
        if not args.dry_run:
            lock = replay_lock(redis, settings, destination)
            if not lock.acquire():
                report("replay", f"a replay to {destination.name} is running already; try again when it ends")
                return 1
        summary = replay(settings, destination, window, args.order, redis, args.dry_run, "cli", lock)
    finally:
        if lock is not None and lock.owned():
            lock.release()
        redis.close()
    if args.json:
        sys.stdout.write(orjson.dumps(summary.as_json()).decode() + "\n")
    else:
        print(summary.as_text())
    if summary.errors:
        report("replay", summary.errors[-1])
        return 1
    return 0

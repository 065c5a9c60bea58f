"""What the ops console shows, read from Redis: the pipeline's overview, the updates waiting for a retry,
the dead-letter queue filtered. Plain functions of a (sync) Redis client; the app runs them in a thread.

Nothing here returns a secret: updates carry no card token (receiver/order.py), Intergiro Error notes
are the allowlisted fields only (receiver/error_notes.py), and RQ's worker records are read for names and jobs.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from redis import Redis
from rq import Queue, Worker
from rq.serializers import JSONSerializer

from receiver.deadletters import SORTS, DeadLetterFilter, DeadLetters
from receiver.deliveries import DeliveryRecord, read_attempts
from receiver.destinations import MERCHANT, split_job_id
from receiver.error_notes import read_error_notes
from receiver.order import parse_update_id
from receiver.rediskeys import RedisKeys
from receiver.redistext import text

OVERVIEW_MINUTES = 60
ERROR_NOTES_SHOWN = 10


def iso(timestamp: float | None) -> str | None:
    if timestamp is None:
        return None
    return datetime.fromtimestamp(timestamp, UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def callbacks_per_minute(redis: Redis, keys: RedisKeys, now: float) -> list[dict[str, Any]]:
    """The last OVERVIEW_MINUTES minutes, oldest first: {minute, outcome: count...}."""
    this_minute = int(now) // 60
    minutes = range(this_minute - OVERVIEW_MINUTES + 1, this_minute + 1)
    with redis.pipeline(transaction=False) as pipe:
        for minute in minutes:
            pipe.hgetall(keys.callback_minute(minute))
        answers = pipe.execute()
    return [
        {"minute": iso(minute * 60), "counts": {text(k): int(v) for k, v in answer.items()}}
        for minute, answer in zip(minutes, answers, strict=True)
    ]


def workers(redis: Redis, queue_name: str, destination: str = MERCHANT) -> list[dict[str, Any]]:
    """RQ's live workers on the queue (RQ's public API: Worker.all, get_current_job), the destination
    each serves and the update each is delivering now."""
    queue = Queue(queue_name, connection=redis, serializer=JSONSerializer)
    found = []
    for worker in Worker.all(connection=redis, queue=queue, serializer=JSONSerializer):
        job = worker.get_current_job()
        update_id = job.id if job is not None else None
        parsed = parse_update_id(split_job_id(update_id)[0]) if update_id else None
        found.append(
            {
                "name": worker.name,
                "serves": destination,
                "hostname": worker.hostname,
                "pid": worker.pid,
                "state": str(worker.get_state()),
                "delivering": update_id,
                "order_id": parsed[0] if parsed else None,
                "last_heartbeat": worker.last_heartbeat.isoformat() if worker.last_heartbeat else None,
                "successful_jobs": worker.successful_job_count,
                "failed_jobs": worker.failed_job_count,
            }
        )
    return sorted(found, key=lambda w: w["name"])


OUTCOMES = ("delivered", "retry_scheduled", "dead_lettered")


def deliveries(counters: dict[str, float], destination: str) -> dict[str, int]:
    """A destination's deliveries by outcome (intergiro_deliveries_total, summed over every worker):
    delivered, retried (`retry_scheduled`), dead-lettered. RQ's own per-worker counts tell a retry as a
    failed job, so the console shows these instead."""
    label = "" if destination == MERCHANT else f"|destination={destination}"
    return {o: int(counters.get(f"intergiro_deliveries_total{label}|outcome={o}", 0)) for o in OUTCOMES}


def overview(
    redis: Redis, keys: RedisKeys, now: float | None = None, destinations: Sequence[RedisKeys] = ()
) -> dict[str, Any]:
    """Everything the overview page shows, as GET /api/overview answers it; the pipeline's figures are
    summed over `destinations` (every destination's keys; `keys` alone when none is given) and given
    per destination too."""
    now = time.time() if now is None else now
    each = list(destinations) or [keys]
    with redis.pipeline(transaction=False) as pipe:  # one round trip for the whole page
        pipe.hlen(keys.dead_letters)
        pipe.get(keys.reconcile_watermark)
        pipe.exists(keys.reconcile_lock)
        pipe.hgetall(keys.metrics)
        pipe.lrange(keys.error_notes, 0, ERROR_NOTES_SHOWN - 1)
        for dest in each:
            pipe.llen(dest.rq_queue)
            pipe.zcard(dest.rq_deferred)
            pipe.zcard(dest.retry_schedule)
        dead, watermark, reconciling, shared, notes, *figures = pipe.execute()
    per_destination = {
        dest.destination: {
            "queue_depth": figures[3 * i],
            "waiting": figures[3 * i + 1],
            "retrying": figures[3 * i + 2],
        }
        for i, dest in enumerate(each)
    }
    depth = sum(f["queue_depth"] for f in per_destination.values())
    waiting = sum(f["waiting"] for f in per_destination.values())
    retrying = sum(f["retrying"] for f in per_destination.values())
    counters = {text(k): float(v) for k, v in shared.items()}
    runs = {
        field.split("outcome=", 1)[1]: int(value)
        for field, value in counters.items()
        if field.startswith("intergiro_reconcile_runs_total|")
    }
    minutes = callbacks_per_minute(redis, keys, now)
    last_hour: dict[str, int] = {}
    for minute in minutes:
        for outcome, n in minute["counts"].items():
            last_hour[outcome] = last_hour.get(outcome, 0) + n
    return {
        "at": iso(now),
        "callbacks_per_minute": minutes,
        "callbacks_last_hour": last_hour,
        "queue_depth": depth,
        "waiting": waiting,
        "retrying": retrying,
        "dead_letters": dead,
        "destinations": per_destination,
        "workers": [w for dest in each for w in workers(redis, dest.queue_name, dest.destination)],
        "deliveries": {dest.destination: deliveries(counters, dest.destination) for dest in each},
        "reconcile": {
            "last_completed_window_end": iso(float(watermark)) if watermark else None,
            "running": bool(reconciling),
            "runs": runs,
            "missed_events": int(counters.get("intergiro_reconcile_missed_events_total", 0)),
            "orders_scanned": int(counters.get("intergiro_reconcile_orders_scanned_total", 0)),
        },
        "intergiro_errors": read_error_notes(notes),
    }


RETRYING_SORTS = ("time", "order", "destination", "attempts")


def retrying_page(
    redis: Redis, destinations: Sequence[RedisKeys], paging: Paging, now: float | None = None
) -> dict[str, Any]:
    """One page of the updates waiting for their next attempt over `destinations`' retry schedules,
    sorted as `paging` says (`time`: when due), and where it stands: {updates, first, last, total, page,
    pages}. By time, only as many as reach the page are read of each schedule; by order or destination
    every id and due time (no record), by attempts every attempt count too; the page's records last."""
    now = time.time() if now is None else now
    sort = paging.sort if paging.sort in RETRYING_SORTS else "time"
    with redis.pipeline(transaction=False) as pipe:
        for dest in destinations:
            pipe.zcard(dest.retry_schedule)
        total = sum(int(n) for n in pipe.execute())
    start, end = paging.window(total)
    if end <= start:
        return _page_of([], 0, 0, total, paging)
    reach = end if sort == "time" else total  # by time, the page is within each schedule's first `end`
    with redis.pipeline(transaction=False) as pipe:
        for dest in destinations:
            if paging.ascending or sort != "time":
                pipe.zrange(dest.retry_schedule, 0, reach - 1, withscores=True)
            else:
                pipe.zrevrange(dest.retry_schedule, 0, reach - 1, withscores=True)
        scheduled = [
            (dest, text(raw_id), float(due))
            for dest, found in zip(destinations, pipe.execute(), strict=True)
            for raw_id, due in found
        ]
    attempts: dict[tuple[str, str], int] = {}
    if sort == "attempts":
        with redis.pipeline(transaction=False) as pipe:
            for dest, job, _ in scheduled:
                read_attempts(pipe, dest.delivery(job))
            for (dest, job, _), n in zip(scheduled, pipe.execute(), strict=True):
                attempts[dest.destination, job] = int(n or 0)

    def by(item: tuple[RedisKeys, str, float]) -> Any:
        dest, job, due = item
        order = parse_update_id(split_job_id(job)[0])
        return {
            "time": (due, job),
            "order": (order[0] if order else job, job),
            "destination": (dest.destination, due, job),
            "attempts": (attempts.get((dest.destination, job), 0), due, job),
        }[sort]

    scheduled.sort(key=by, reverse=not paging.ascending)
    chosen = scheduled[start:end]
    with redis.pipeline(transaction=False) as pipe:
        for dest, job, _ in chosen:
            pipe.hgetall(dest.delivery(job))
        records = pipe.execute()
    updates = [
        _retrying_update(dest, job, due, record, now)
        for (dest, job, due), record in zip(chosen, records, strict=True)
    ]
    return _page_of(updates, start, end, total, paging)


def _page_of(
    updates: list[dict[str, Any]], start: int, end: int, total: int, paging: Paging
) -> dict[str, Any]:
    return {"updates": updates, "first": start + 1 if end > start else 0, "last": end, "total": total,
            "page": start // paging.size + 1, "pages": max(1, -(-total // paging.size))}  # fmt: skip


def _retrying_update(
    keys: RedisKeys, update_id: str, due: float, record: dict[Any, Any], now: float
) -> dict[str, Any]:
    """A retrying update as the console and the API show it."""
    delivery = DeliveryRecord.parse(record)
    parsed = parse_update_id(split_job_id(update_id)[0])
    return {
        "id": update_id,
        "order_id": parsed[0] if parsed else None,
        "due_at": iso(due),
        "due_in_seconds": round(max(due - now, 0.0), 1),
        "attempts": delivery.attempts,
        "last_error": delivery.last_error,
        "last_error_at": delivery.last_error_at,
        **({} if keys.destination == MERCHANT else {"destination": keys.destination}),
    }


PAGE_SIZES = (25, 50, 100, 200, 500)


@dataclass(frozen=True)
class Paging:
    """Which page of a list: `number` from 1, `size` one of PAGE_SIZES, sorted by `sort`, newest or
    highest first unless `ascending`."""

    number: int = 1
    size: int = 50
    sort: str = "time"
    ascending: bool = False

    def window(self, count: int) -> tuple[int, int]:
        """The first and past-the-last index of this page in a list of `count` (the last page when
        `number` is past it)."""
        pages = max(1, -(-count // self.size))
        start = (min(self.number, pages) - 1) * self.size
        return start, min(start + self.size, count)


def dead_letter_page(
    redis: Redis, keys: RedisKeys, chosen: DeadLetterFilter, paging: Paging
) -> dict[str, Any]:
    """One page of the dead letters `chosen` matches, sorted as `paging` says, and the counts that say
    where it stands: {entries, first, last, matching, total, page, pages}."""
    found = list(DeadLetters(redis, keys).matching(chosen))
    total = redis.hlen(keys.dead_letters)
    found.sort(key=SORTS[paging.sort], reverse=not paging.ascending)
    start, end = paging.window(len(found))
    return {
        "entries": found[start:end],
        "first": start + 1 if end > start else 0,
        "last": end,
        "matching": len(found),
        "total": max(int(total), len(found)),  # type: ignore[arg-type]
        "page": start // paging.size + 1,
        "pages": max(1, -(-len(found) // paging.size)),
    }

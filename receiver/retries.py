"""The retry schedule: how long a failed delivery waits before its next attempt, and when it gives up.

By default an update is retried for more than a day before it is dead-lettered (DAY_SCHEDULE: a merchant
that deploys for ten minutes, or is down for a night, loses nothing): the waits after attempts 1, 2, ...
are DELIVERY_RETRY_SCHEDULE's (`DESTINATION_<NAME>_RETRY_SCHEDULE` for another destination), each
lengthened by a random share of up to JITTER (so retries of updates that failed together spread out, and
the schedule never adds up to less than its sum). DELIVERY_BACKOFF_SECONDS, when set, chooses the
exponential backoff instead (full jitter over base * 2^(n-1), capped at one hour).
"""

from __future__ import annotations

import random
import re
import time
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

from redis import Redis

from receiver.deliveries import LUA as DELIVERY_RECORD_LUA
from receiver.redistext import text
from receiver.rqstore import JOB_PREFIX, QUEUES_KEY, rq_timestamp

if TYPE_CHECKING:  # receiver.rediskeys imports this module (through receiver.destinations)
    from receiver.rediskeys import RedisKeys

# The waits after failed attempts 1..9 (10 attempts): 92 165 s, about 25.6 hours in all, so that even a
# merchant down for a whole day gets its updates once it is back. Stripe retries for three days, Svix for
# about a day; a day covers a deploy gone wrong, a night's outage and a weekend morning's fix.
DAY_SCHEDULE: tuple[float, ...] = (5, 60, 300, 1800, 3600, 7200, 14400, 28800, 36000)
JITTER = 0.1  # each wait grows by up to 10%: never shorter than the schedule says
MAX_RETRY_AFTER_SECONDS = 3600.0  # a merchant's Retry-After is honoured up to an hour
MAX_BACKOFF_SECONDS = 3600.0  # the exponential backoff's cap
EXPONENTIAL_MAX_ATTEMPTS = 8  # attempts of the exponential backoff unless DELIVERY_MAX_ATTEMPTS says
UNITS = {"": 1, "ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_duration(raw: str) -> float:
    """Seconds of `5`, `5s`, `250ms`, `1m`, `2h`, `1d`."""
    found = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d|)\s*", raw)
    if not found:
        raise ValueError(f"{raw.strip()!r} is not a duration (e.g. 30s, 5m, 2h)")
    return float(found[1]) * UNITS[found[2]]


def parse_schedule(raw: str) -> tuple[float, ...]:
    """A comma-separated list of waits (`5s,1m,5m,30m,1h`): at least one, at most 99, each at most a week."""
    waits = tuple(parse_duration(part) for part in raw.split(","))
    if len(waits) > 99:
        raise ValueError("at most 99 waits (100 attempts)")
    if any(w > 7 * 86400 for w in waits):
        raise ValueError("a wait is longer than a week")
    return waits


def format_duration(seconds: float) -> str:
    """`5s`, `1m`, `2h`, `1h30m`: how the docs and `destination list` show a wait."""
    if seconds < 1:
        return f"{seconds * 1000:g}ms"
    whole = round(seconds)
    parts = [
        (whole // 86400, "d"),
        (whole % 86400 // 3600, "h"),
        (whole % 3600 // 60, "m"),
        (whole % 60, "s"),
    ]
    return "".join(f"{n}{unit}" for n, unit in parts if n) or "0s"


def schedule_wait(
    schedule: tuple[float, ...],
    attempt: int,
    retry_after: float | None = None,
    rng: Callable[[], float] = random.random,
) -> float:
    """Seconds to wait after failed attempt number `attempt` (1-based): the schedule's wait for it (its
    last one past its end) lengthened by up to JITTER, never sooner than the merchant's Retry-After."""
    wait = schedule[min(attempt, len(schedule)) - 1] * (1 + JITTER * rng())
    if retry_after is not None:
        wait = max(wait, min(retry_after, MAX_RETRY_AFTER_SECONDS))
    return float(wait)


def backoff_delay(
    attempt: int, base: float, retry_after: float | None = None, rng: Callable[[], float] = random.random
) -> float:
    """The exponential backoff's wait after failed attempt number `attempt` (1-based): full jitter over
    base * 2^(n-1), capped at one hour, and never sooner than the merchant's Retry-After (itself capped
    at one hour)."""
    ceiling = min(MAX_BACKOFF_SECONDS, base * 2 ** min(attempt - 1, 64))
    delay = rng() * ceiling
    if retry_after is not None:
        delay = max(delay, min(retry_after, MAX_RETRY_AFTER_SECONDS))
    return float(delay)


def retry_wait(
    schedule: tuple[float, ...], backoff_seconds: float | None, attempt: int, retry_after: float | None = None
) -> float:
    """A destination's wait after failed attempt `attempt`: exponential when it has a backoff base, its
    schedule's otherwise."""
    if backoff_seconds is not None:
        return backoff_delay(attempt, backoff_seconds, retry_after)
    return schedule_wait(schedule, attempt, retry_after)


def attempts_of(schedule: tuple[float, ...], backoff_seconds: float | None, max_attempts: int | None) -> int:
    """Attempts before the dead-letter queue: DELIVERY_MAX_ATTEMPTS when set, else one more than the
    schedule's waits (EXPONENTIAL_MAX_ATTEMPTS with the exponential backoff)."""
    if max_attempts is not None:
        return max_attempts
    return EXPONENTIAL_MAX_ATTEMPTS if backoff_seconds is not None else len(schedule) + 1


# KEYS: retry schedule, delivery record, metrics. ARGV: order id, update id, due time, error, error
# time, the attempt's history entry ('' for none), then pairs of metrics field and amount. The history's
# fragment (receiver.history) comes before it. The job itself goes to RQ's ScheduledJobRegistry as RQ
# records the attempt's Retry (workers/delivery.py).
SCHEDULE_RETRY = """
redis.call('ZADD', KEYS[1], ARGV[3], ARGV[2])
note_failure(KEYS[2], ARGV[4], ARGV[5])
for i = 7, #ARGV, 2 do redis.call('HINCRBYFLOAT', KEYS[3], ARGV[i], ARGV[i + 1]) end
if ARGV[6] ~= '' then remember(ARGV[6]) end
return 1
"""

# KEYS: retry schedule, RQ's ScheduledJobRegistry, queue, RQ queue set. ARGV: now (Unix), job prefix,
# now (RQ format), limit.
# Queues the updates whose retry is due, to the microsecond (RQ's own scheduler, if one runs, keeps
# whole seconds and would queue them up to a second later). Only a job RQ recorded as scheduled moves;
# one still `started` is the attempt that scheduled the retry, not yet recorded by RQ. Any other state
# (queued by RQ's scheduler, deleted) leaves the schedule. Returns the number moved and the next due time.
# The retry scripts' common step, written once: a job RQ recorded as scheduled leaves the schedule and
# RQ's ScheduledJobRegistry and goes on the queue (its locals: schedule, registry, queue, stamp).
QUEUE_SCHEDULED = """
local function queue_scheduled(id, job)
  redis.call('ZREM', schedule, id)
  redis.call('ZREM', registry, id)
  redis.call('HSET', job, 'status', 'queued', 'enqueued_at', stamp)
  redis.call('RPUSH', queue, id)
end
"""
MOVE_DUE = (
    """
local schedule, registry, queue = KEYS[1], KEYS[2], KEYS[3]
local now, job_prefix, stamp, limit = ARGV[1], ARGV[2], ARGV[3], tonumber(ARGV[4])
"""
    + QUEUE_SCHEDULED
    + """
local moved = 0
for _, id in ipairs(redis.call('ZRANGEBYSCORE', schedule, '-inf', now, 'LIMIT', 0, limit)) do
  local job = job_prefix .. id
  local status = redis.call('HGET', job, 'status')
  if status == 'scheduled' then
    queue_scheduled(id, job)
    moved = moved + 1
  elseif status ~= 'started' then
    redis.call('ZREM', schedule, id)
  end
end
if moved > 0 then redis.call('SADD', KEYS[4], queue) end
local first = redis.call('ZRANGE', schedule, 0, 0, 'WITHSCORES')
return {moved, first[2] or ''}
"""
)

# KEYS: retry schedule, RQ's ScheduledJobRegistry, queue, RQ queue set. ARGV: update id, now (Unix), job
# prefix, now (RQ format).
# Ops' "retry now": one update waiting for its next attempt is made due at once, by MOVE_DUE's rules, in
# one step (schedule, registry, job and queue must agree). A job RQ recorded as scheduled is queued now;
# one still `started` (the attempt that scheduled the retry is being recorded) is made due now, and the
# next sweep queues it; any other state leaves the schedule, as MOVE_DUE does. Returns 1 queued, 2 due,
# 0 when the update was not waiting for a retry.
RETRY_NOW = (
    """
local schedule, registry, queue = KEYS[1], KEYS[2], KEYS[3]
local id, now, job_prefix, stamp = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
"""
    + QUEUE_SCHEDULED
    + """
if not redis.call('ZSCORE', schedule, id) then return 0 end
local job = job_prefix .. id
local status = redis.call('HGET', job, 'status')
if status == 'scheduled' then
  queue_scheduled(id, job)
  redis.call('SADD', KEYS[4], queue)
  return 1
elseif status == 'started' then
  redis.call('ZADD', schedule, 'XX', now, id)
  return 2
end
redis.call('ZREM', schedule, id)
return 0
"""
)

# KEYS: retry schedule. ARGV: now (Unix), limit. Ops' "retry all now": up to `limit` updates whose retry
# is due later are made due now; MOVE_DUE then queues them by its rules (each is its order's head, so
# every order stays in sequence). Returns how many were made due.
MAKE_DUE = """
local ids = redis.call('ZRANGEBYSCORE', KEYS[1], '(' .. ARGV[1], '+inf', 'LIMIT', 0, tonumber(ARGV[2]))
for _, id in ipairs(ids) do redis.call('ZADD', KEYS[1], 'XX', ARGV[1], id) end
return #ids
"""


def read_due(pipe: Any, keys: RedisKeys, job_id: str) -> None:
    """Queue on `pipe` when delivery `job_id`'s next attempt is due (Unix seconds; None: not retrying)."""
    pipe.zscore(keys.retry_schedule, job_id)


class RetrySchedule:
    """The scripts above, bound to one Redis client and one destination's keys."""

    def __init__(self, redis: Redis, keys: RedisKeys, history_ttl: int = 0) -> None:
        # not at the top: receiver.history imports receiver.destinations, which imports this module
        from receiver.history import lua_write

        self.redis = redis
        self.keys = keys
        order = "local order_id = ARGV[1]\n"  # the history fragment's
        self._schedule = redis.register_script(
            order + lua_write(keys.history(""), history_ttl) + DELIVERY_RECORD_LUA + SCHEDULE_RETRY
        )
        self._move_due = redis.register_script(MOVE_DUE)
        self._retry_now = redis.register_script(RETRY_NOW)
        self._make_due = redis.register_script(MAKE_DUE)

    def schedule_retry(
        self,
        update: dict[str, Any],
        due: float,
        error: str,
        error_at: str,
        counters: Iterable[tuple[str, float]],
        history: bytes = b"",
    ) -> None:
        """Schedule the update's next attempt at `due` (Unix seconds), after `error` (at `error_at`),
        adding `counters` (metrics hash field, amount) and the attempt's `history` entry in the same step."""
        k = self.keys
        job = k.job_id(update["id"])
        args: list[Any] = [update["order_id"], job, repr(due), error, error_at, history]
        for field, amount in counters:
            args += (field, repr(amount))
        self._schedule(keys=[k.retry_schedule, k.delivery(job), k.metrics], args=args)

    def move_due(self, limit: int = 500) -> tuple[int, float | None]:
        """Queue the updates whose retry is due; returns how many, and when the next one is due."""
        k = self.keys
        moved, first = self._move_due(
            keys=[k.retry_schedule, k.rq_scheduled, k.rq_queue, QUEUES_KEY],
            args=[repr(time.time()), JOB_PREFIX, rq_timestamp(), limit],
        )
        first = text(first)
        return int(moved), float(first) if first else None

    def retry_now(self, update_id: str) -> bool:
        """Make an update waiting for its next attempt due now (queued at once when RQ has recorded its
        retry); False when it was not waiting for a retry."""
        k = self.keys
        answer = self._retry_now(
            keys=[k.retry_schedule, k.rq_scheduled, k.rq_queue, QUEUES_KEY],
            args=[update_id, repr(time.time()), JOB_PREFIX, rq_timestamp()],
        )
        return bool(int(answer))

    def retry_all_now(self, batch: int = 500) -> int:
        """Make every update waiting for its next attempt due now, and queue them (each order still in
        sequence: a retrying update is its order's head); how many were due later."""
        now, made = time.time(), 0
        while True:
            n = int(self._make_due(keys=[self.keys.retry_schedule], args=[repr(now), batch]))
            made += n
            if n < batch:
                break
        while self.move_due(batch)[0] == batch:
            pass
        return made

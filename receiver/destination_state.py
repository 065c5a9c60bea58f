"""A destination's state, deployment-wide: `up`, `paused` by an operator, or `down` (its breaker open).

One Redis hash per destination (RedisKeys.destination_state) that every worker process reads before it
takes a job off the destination's queue (workers/gate.py): while the destination is paused no job is
taken, so its updates wait on the queue, in their orders' sequence, and spend no attempts; a pause lives
in Redis, so it survives a restart of every process. The fields:

- `paused_at`, `paused_reason`, `paused_by`: set by `destination pause` or the console, gone on resume.
- The breaker's: `failures` (consecutive attempts that found the destination unreachable: refused,
  timed out, 502/503/504), `down_since` (set once `failures` reaches BREAKER_FAILURES), `probe_wait`
  and `probe_at` (when the next probe may go), `last_error`. While down, one delivery at a time across
  the deployment (the probe: its token in RedisKeys.destination_probe) goes out every `probe_wait`
  seconds, doubling up to BREAKER_MAX_PROBE_SECONDS; every other update waits on the queue and spends no
  attempt. Any answer that shows the destination reachable (2xx, or another status) closes the breaker.
"""

from __future__ import annotations

import argparse
import getpass
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import orjson
from redis import Redis

from receiver import rqstore
from receiver.connections import sync_redis
from receiver.destinations import Breaker
from receiver.errors import report
from receiver.logs import log
from receiver.rediskeys import RedisKeys, configured_destination_keys
from receiver.redistext import text
from receiver.retries import RetrySchedule, format_duration
from receiver.settings import Settings

UP, DOWN, PAUSED = "up", "down", "paused"
MAX_REASON_CHARS = 500
SNAPSHOT_SECONDS = 1.0  # how stale a worker's view may be: a pause holds new jobs within about a second


def _iso(timestamp: float | None) -> str | None:
    if timestamp is None:
        return None
    return datetime.fromtimestamp(timestamp, UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


# KEYS: state, probe. ARGV: now, threshold, first probe wait, longest probe wait, probe (1/0), error.
# An attempt found the destination unreachable. Counted, and the destination marked down once there were
# `threshold` in a row; a probe's failure doubles the wait for the next probe and frees the probe's
# place. One script: the count, the mark and the probe's schedule must agree for every process.
# Returns 1 when this attempt marked the destination down.
UNREACHABLE = """
local now, probe = tonumber(ARGV[1]), ARGV[5]
redis.call('HSET', KEYS[1], 'last_error', ARGV[6])
if redis.call('HEXISTS', KEYS[1], 'down_since') == 1 then
  if probe == '1' then
    local wait = math.min(tonumber(redis.call('HGET', KEYS[1], 'probe_wait') or ARGV[3]) * 2, tonumber(ARGV[4]))
    redis.call('HSET', KEYS[1], 'probe_wait', wait, 'probe_at', now + wait)
    redis.call('DEL', KEYS[2])
  end
  return 0
end
if redis.call('HINCRBY', KEYS[1], 'failures', 1) < tonumber(ARGV[2]) then return 0 end
redis.call('HSET', KEYS[1], 'down_since', ARGV[1], 'probe_wait', ARGV[3], 'probe_at', now + tonumber(ARGV[3]))
return 1
"""
# KEYS: state, probe. The destination answered: the count starts again, and a destination that was down
# is up (its probe's place freed). Returns 1 when it was down.
REACHABLE = """
local was_down = redis.call('HEXISTS', KEYS[1], 'down_since')
redis.call('HDEL', KEYS[1], 'failures', 'down_since', 'probe_wait', 'probe_at', 'last_error')
redis.call('DEL', KEYS[2])
return was_down
"""
# KEYS: probe. ARGV: token. A probe that found no job gives its place back (only its own: compare, delete).
RELEASE_PROBE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""
# KEYS: state, probe. ARGV: now, token, lease (ms). A worker of a down destination asks to send the probe:
# granted (1) when its time has come and no other probe is out (the token, lapsing after one attempt's
# time, holds the place), and the next probe's time set; 0 when not; 2 when the destination is not down.
TRY_PROBE = """
if redis.call('HEXISTS', KEYS[1], 'down_since') == 0 then return 2 end
if redis.call('HEXISTS', KEYS[1], 'paused_at') == 1 then return 0 end
local now = tonumber(ARGV[1])
if now < tonumber(redis.call('HGET', KEYS[1], 'probe_at') or 0) then return 0 end
if not redis.call('SET', KEYS[2], ARGV[2], 'NX', 'PX', ARGV[3]) then return 0 end
redis.call('HSET', KEYS[1], 'probe_at', now + tonumber(redis.call('HGET', KEYS[1], 'probe_wait') or 1))
return 1
"""


@dataclass(frozen=True)
class StateView:
    """One read of a destination's state."""

    destination: str
    paused_at: float | None = None
    paused_reason: str = ""
    paused_by: str = ""
    down_since: float | None = None
    failures: int = 0
    probe_at: float | None = None
    last_error: str = ""

    @property
    def state(self) -> str:
        return PAUSED if self.paused_at is not None else DOWN if self.down_since is not None else UP

    def as_dict(self) -> dict[str, Any]:
        paused_at = None
        if self.paused_at is not None:
            paused_at = datetime.fromtimestamp(self.paused_at, UTC).isoformat(timespec="seconds")
        return {
            "state": self.state,
            "paused_at": paused_at and paused_at.replace("+00:00", "Z"),
            "paused_reason": self.paused_reason,
            "paused_by": self.paused_by,
            "down_since": _iso(self.down_since),
            "next_probe_at": _iso(self.probe_at) if self.down_since is not None else None,
            "consecutive_failures": self.failures,
            "last_error": self.last_error,
        }

    @classmethod
    def parse(cls, destination: str, fields: dict[Any, Any]) -> StateView:
        f = {text(k): text(v) for k, v in fields.items()}
        return cls(
            destination,
            paused_at=float(f["paused_at"]) if "paused_at" in f else None,
            paused_reason=f.get("paused_reason", ""),
            paused_by=f.get("paused_by", ""),
            down_since=float(f["down_since"]) if "down_since" in f else None,
            failures=int(f.get("failures", 0)),
            probe_at=float(f["probe_at"]) if "probe_at" in f else None,
            last_error=f.get("last_error", ""),
        )


PAUSE_FIELDS = ("paused_at", "paused_reason", "paused_by")
# KEYS: state. ARGV: now, reason, by. The three fields are set together, and only when not paused already
# (a second pause must not overwrite who paused it and why).
PAUSE = """
if redis.call('HEXISTS', KEYS[1], 'paused_at') == 1 then return 0 end
redis.call('HSET', KEYS[1], 'paused_at', ARGV[1], 'paused_reason', ARGV[2], 'paused_by', ARGV[3])
return 1
"""


class DestinationState:
    """The state of one destination (its keys): read it (a snapshot at most SNAPSHOT_SECONDS old for the
    workers), pause and resume it."""

    def __init__(self, redis: Redis, keys: RedisKeys, breaker: Breaker | None = None) -> None:
        self.redis = redis
        self.keys = keys
        self.breaker = breaker or Breaker()
        self._unreachable = redis.register_script(UNREACHABLE)
        self._reachable = redis.register_script(REACHABLE)
        self._try_probe = redis.register_script(TRY_PROBE)
        self._release_probe = redis.register_script(RELEASE_PROBE)
        self.snapshot = StateView(keys.destination)
        self.read_at = -SNAPSHOT_SECONDS
        self._pause = redis.register_script(PAUSE)

    def read(self) -> StateView:
        fields: dict[Any, Any] = self.redis.hgetall(self.keys.destination_state)  # type: ignore[assignment]
        self.snapshot = StateView.parse(self.keys.destination, fields)
        self.read_at = time.monotonic()
        return self.snapshot

    def current(self) -> StateView:
        """The state as last read, read again when older than SNAPSHOT_SECONDS."""
        if time.monotonic() - self.read_at >= SNAPSHOT_SECONDS:
            return self.read()
        return self.snapshot

    def pause(self, reason: str = "", by: str = "") -> bool:
        """Hold the destination's deliveries; False when it was paused already (its reason is kept)."""
        paused = self._pause(
            keys=[self.keys.destination_state], args=[repr(time.time()), reason[:MAX_REASON_CHARS], by]
        )
        if paused:
            log.warning("destination paused", destination=self.keys.destination, reason=reason, by=by)
        return bool(paused)

    def reachable(self, probe: bool = False) -> bool:
        """An attempt got an answer: the breaker closes. Writes only when this process saw failures counted
        or the destination down (or the attempt was the probe); True when the destination was down."""
        if not (probe or self.snapshot.failures or self.snapshot.down_since is not None):
            return False
        was_down = bool(self._reachable(keys=[self.keys.destination_state, self.keys.destination_probe]))
        self.read()
        if was_down:
            log.warning("destination up: delivering again", destination=self.keys.destination)
        return was_down

    def unreachable(self, error: str, probe: bool = False) -> bool:
        """An attempt found the destination unreachable; True when that marked it down."""
        if self.breaker.failures <= 0:  # BREAKER_FAILURES=0: no breaker
            return False
        b = self.breaker
        marked = bool(
            self._unreachable(
                keys=[self.keys.destination_state, self.keys.destination_probe],
                args=[
                    repr(time.time()),
                    b.failures,
                    b.probe_seconds,
                    b.max_probe_seconds,
                    int(probe),
                    error[:500],
                ],
            )
        )
        self.read()
        if marked:
            log.warning(
                "destination down: one probe at a time until it answers", destination=self.keys.destination,
                failures=b.failures, error=error, probe_in=b.probe_seconds,
            )  # fmt: skip
        return marked

    def try_probe(self, token: str, lease_seconds: float) -> int:
        """1: send the probe now; 0: not now; 2: the destination is not down (any more)."""
        return int(
            self._try_probe(
                keys=[self.keys.destination_state, self.keys.destination_probe],
                args=[repr(time.time()), token, int(lease_seconds * 1000)],
            )
        )

    def release_probe(self, token: str) -> None:
        """The probe `token` was granted for took no job (its queue was empty): another may go."""
        self._release_probe(keys=[self.keys.destination_probe], args=[token])

    def resume(self, by: str = "") -> bool:
        """Deliver again; False when it was not paused."""
        resumed = self.redis.hdel(self.keys.destination_state, *PAUSE_FIELDS)
        if resumed:
            log.warning("destination resumed", destination=self.keys.destination, by=by)
        return bool(resumed)


# How many of each list `describe` reads for the age of the oldest undelivered update: queued ones from
# the queue's front, every in-flight one, retrying ones soonest due first. Bounded, so that a large backlog
# costs one round trip of a known size; an age read from them is then at least the true one's lower bound.
OLDEST_SCAN = 1000


def _age(created_at: Any, now: float) -> float | None:
    if not created_at:
        return None
    try:
        at = datetime.fromisoformat(text(created_at).replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None
    return max(0.0, now - at)


def describe(redis: Redis, each: Sequence[RedisKeys], now: float | None = None) -> list[dict[str, Any]]:
    """Every destination's state and figures, as `destination list --json` and GET /api/destinations show
    them: `state`, the pause (when, why, by whom), deliveries `in_flight` (RQ's StartedJobRegistry),
    `queued` (on the RQ queue), `waiting` (behind their order's head), `retrying`, and
    `oldest_undelivered_seconds` (the age of the oldest update not yet delivered: queued, in flight or
    retrying; None when there is none)."""
    now = time.time() if now is None else now
    with redis.pipeline(transaction=False) as pipe:  # one round trip for the figures
        for keys in each:
            pipe.hgetall(keys.destination_state)
            pipe.zcard(rqstore.started_key(keys.queue_name))
            pipe.llen(keys.rq_queue)
            pipe.zcard(keys.rq_deferred)
            pipe.zcard(keys.retry_schedule)
            pipe.lrange(keys.rq_queue, 0, OLDEST_SCAN - 1)
            pipe.zrange(rqstore.started_key(keys.queue_name), 0, OLDEST_SCAN - 1)
            pipe.zrange(keys.retry_schedule, 0, OLDEST_SCAN - 1)
        answers = pipe.execute()
    rows, undelivered = [], []
    for n, keys in enumerate(each):
        fields, in_flight, queued, waiting, retrying, *lists = answers[8 * n : 8 * n + 8]
        view = StateView.parse(keys.destination, fields)
        rows.append(
            {"destination": keys.destination, **view.as_dict(), "in_flight": in_flight, "queued": queued,
             "waiting": waiting, "retrying": retrying}
        )  # fmt: skip
        undelivered.append(
            {text(i).split(":")[0] for listed in lists for i in listed}
        )  # started: id:execution
    with redis.pipeline(transaction=False) as pipe:  # and one for the oldest of each
        for ids in undelivered:
            for job in ids:
                pipe.hget(rqstore.job_key(job), "created_at")
        created = iter(pipe.execute())
    for row, ids in zip(rows, undelivered, strict=True):
        ages = [a for a in (_age(next(created), now) for _ in ids) if a is not None]
        row["oldest_undelivered_seconds"] = round(max(ages), 1) if ages else None
    return rows


def _note(row: dict[str, Any]) -> str:
    if row["state"] == PAUSED:
        return f"paused by {row['paused_by'] or '?'} at {row['paused_at']}: {row['paused_reason']}"
    if row["state"] == DOWN:
        return f"down since {row['down_since']}, next probe {row['next_probe_at']}: {row['last_error']}"
    return ""


def format_age(seconds: float | None) -> str:
    return "-" if seconds is None else format_duration(seconds) if seconds >= 1 else "0s"


def run_destination_command(settings: Settings, args: argparse.Namespace) -> int:
    """`intergiro-receiver destination list|pause|resume`: 0 when done, 1 for a destination not
    configured."""
    redis = sync_redis(settings, timeout=10)
    try:
        each = configured_destination_keys(settings)
        if args.destination_command == "list":
            rows = describe(redis, each)
            if args.json:
                print(orjson.dumps(rows, option=orjson.OPT_INDENT_2).decode())
                return 0
            print(f"{'DESTINATION':<20} {'STATE':<7} {'IN-FLIGHT':>9} {'QUEUED':>7} {'WAITING':>7} "
                  f"{'RETRYING':>8} {'OLDEST':>8}  NOTE")  # fmt: skip
            for r in rows:
                note = _note(r)
                print(f"{r['destination']:<20} {r['state']:<7} {r['in_flight']:>9} {r['queued']:>7} "
                      f"{r['waiting']:>7} {r['retrying']:>8} {format_age(r['oldest_undelivered_seconds']):>8}  {note}")  # fmt: skip
            return 0
        found = next((k for k in each if k.destination == args.name), None)
        if found is None:
            names = ", ".join(k.destination for k in each)
            report("destination", f"no destination {args.name!r} is configured (configured: {names})")
            return 1
        state = DestinationState(redis, found)
        by = f"cli:{getpass.getuser()}"
        if args.destination_command == "pause":
            done = state.pause(args.reason or "", by)
            print(f"{args.name}: {'paused' if done else 'already paused'}")
        else:
            done = state.resume(by)
            print(f"{args.name}: {'resumed' if done else 'was not paused'}")
        return 0
    finally:
        redis.close()


def retry_all_now(redis: Redis, each: Sequence[RedisKeys], by: str) -> dict[str, int]:
    """Make every retrying update of the destinations `each` due now (`retry-now`, the console's and
    the API's retry-now): per destination, how many were due later. Logged with who asked."""
    made = {keys.destination: RetrySchedule(redis, keys).retry_all_now() for keys in each}
    for name, n in made.items():
        log.info("retry now: every retrying update made due", destination=name, updates=n, by=by)
    return made


def run_retry_now(settings: Settings, args: argparse.Namespace) -> int:
    """`intergiro-receiver retry-now [--destination NAME]`: 0 when done, 1 for a destination not
    configured."""
    redis = sync_redis(settings, timeout=10)
    try:
        each = configured_destination_keys(settings)
        if args.destination:
            chosen = [k for k in each if k.destination == args.destination]
            if not chosen:
                names = ", ".join(k.destination for k in each)
                report(
                    "retry-now", f"no destination {args.destination!r} is configured (configured: {names})"
                )
                return 1
            each = chosen
        for name, n in retry_all_now(redis, each, f"cli:{getpass.getuser()}").items():
            print(f"{name}: {n} retrying update(s) made due now")
        return 0
    finally:
        redis.close()

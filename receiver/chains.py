"""Per-order chains: join, advance, requeue; and the retry schedule. Each change is one Lua script.

An order's first unfinished update is its "head", the only one of the order on the RQ queue (or, while
it waits for a retry, in RQ's ScheduledJobRegistry); the others wait in event order in the order's list
and in RQ's DeferredJobRegistry. When the head is finished (delivered or dead-lettered) the next waiting
update becomes the head and goes on the queue. Every script changes several keys that must agree (head,
waiting list, queue, registries, job hash), so each is atomic: a process dying between two commands
would otherwise lose an update or block its order.

The fragments (join, advance, dead-lettering a job deleted from outside) are written once, in PRELUDE,
and every script that changes a chain starts with it. Keys that are the same for every order are
written into the scripts' text: the product runs on one Redis server (not Redis Cluster).
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import Any

from redis import Redis

from receiver.clock import utc_now
from receiver.logs import log
from receiver.metrics import counter_increment
from receiver.rediskeys import RedisKeys
from receiver.rqstore import (
    JOB_DATA_HEAD,
    JOB_DATA_TAIL,
    JOB_PREFIX,
    QUEUES_KEY,
    lua_string,
    rq_timestamp,
    template_args,
)

DELETED_OUTSIDE = "job deleted outside intergiro-receiver"
DEAD_LETTERED = counter_increment("intergiro_deliveries_total", outcome="dead_lettered")

# KEYS[1] the order's head, KEYS[2] its waiting list; ARGV[1] order id, ARGV[2] now in RQ's format,
# ARGV[3] now in Unix seconds, ARGV[4] now as the product writes it. The {NAMES} are filled in once.
PRELUDE = """
local head, waiting = KEYS[1], KEYS[2]
local order_id, stamp, now, now_text = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
local queue, queues, active, deferred = {QUEUE}, {QUEUES}, {ACTIVE}, {DEFERRED}
local pending, dead_letters, metrics = {PENDING}, {DEAD_LETTERS}, {METRICS}
local job_prefix, delivery_prefix = {JOB_PREFIX}, {DELIVERY_PREFIX}
local fields = {FIELDS}
local deleted = {}
local history_prefix, history_ttl = {HISTORY_PREFIX}, {HISTORY_TTL}

-- One entry of the order's history (receiver/history.py), in the step that changes what it tells of;
-- kept history_ttl seconds after the order's last entry (0: no history). Updates are named there by
-- their id without the order id and its dash (`1-charge`): the list is the order's already.
local function short(id)
  return cjson.encode(string.sub(id, #order_id + 2))
end

local function remember(entry)
  if history_ttl > 0 then
    local key = history_prefix .. order_id
    redis.call('RPUSH', key, entry)
    redis.call('EXPIRE', key, history_ttl)
  end
end

-- Join the order's chain: queued at once as its head when the order has none (or this is it),
-- otherwise waiting behind it (listed in RQ's DeferredJobRegistry). Writes the job as RQ would.
local function join(id, update)
  local status = 'deferred'
  local current = redis.call('GET', head)
  if not current or current == id then
    redis.call('SET', head, id)
    redis.call('SADD', active, order_id)
    redis.call('RPUSH', queue, id)
    status = 'queued'
  else
    redis.call('RPUSH', waiting, id)
    redis.call('ZADD', deferred, now, id)
  end
  redis.call('HSET', pending, id, update)
  redis.call('HSET', job_prefix .. id, 'data', {DATA_HEAD} .. update .. {DATA_TAIL}, 'status', status,
    'created_at', stamp, 'enqueued_at', stamp, 'description', 'deliver_update(' .. id .. ')', unpack(fields))
  redis.call('SADD', queues, queue)
  return status
end

-- An update whose RQ job was deleted from outside (rq-dashboard, `rq empty`, Job.delete()) goes to the
-- dead-letter queue from the copy in `pending`, never silently away; the caller logs its id.
local function dead_letter_deleted(id)
  deleted[#deleted + 1] = id
  local update = redis.call('HGET', pending, id)
  if not update then return end
  local record = delivery_prefix .. id
  local attempts = tonumber(redis.call('HGET', record, 'attempts') or '0')
  local entry = '{"id":' .. cjson.encode(id) .. ',"order_id":' .. cjson.encode(order_id)
    .. ',"update":' .. update .. ',"attempts":' .. attempts .. ',"last_error":' .. {REASON}
    .. ',"last_error_at":' .. cjson.encode(now_text) .. ',"dead_lettered_at":' .. cjson.encode(now_text) .. '}'
  redis.call('HSET', dead_letters, id, entry)
  redis.call('HDEL', pending, id)
  redis.call('DEL', record)
  redis.call('HINCRBYFLOAT', metrics, {DEAD_LETTERED_FIELD}, 1)
  remember('{"kind":"deleted_outside","at":' .. cjson.encode(now_text) .. ',"update":' .. short(id) .. '}')
end

-- The head is finished: the next waiting update (whose job still exists) becomes the head and is
-- queued; when none waits, the order has no head. Returns the new head, or ''.
local function advance()
  while true do
    local next_id = redis.call('LPOP', waiting)
    if not next_id then
      redis.call('DEL', head)
      redis.call('SREM', active, order_id)
      return ''
    end
    redis.call('ZREM', deferred, next_id)
    local job = job_prefix .. next_id
    if redis.call('EXISTS', job) == 1 then
      redis.call('SET', head, next_id)
      redis.call('SADD', active, order_id)
      redis.call('HSET', job, 'status', 'queued', 'enqueued_at', stamp)
      redis.call('RPUSH', queue, next_id)
      return next_id
    end
    dead_letter_deleted(next_id)
  end
end
"""

# KEYS[3] the order's seen hash. ARGV[5] its TTL; ARGV[6] the history entry's start ('' for none: a JSON
# object without its closing brace, completed here with `outcome` and `queued`); ARGV[7] '1' to write it
# even when nothing was queued (a callback, not a reconcile run); ARGV[8] the merchant order number's
# index key ('' for none); then per update: event key, id, update (JSON), status.
# Dedup and join in one step: a marker is never written without its job, nor a job without its marker.
INTAKE = """
local queued, items = {}, {}
for i = 9, #ARGV, 4 do
  if redis.call('HSETNX', KEYS[3], ARGV[i], 1) == 1 then
    join(ARGV[i + 1], ARGV[i + 2])
    queued[#queued + 1] = ARGV[i + 1]
    items[#items + 1] = '{"id":' .. short(ARGV[i + 1]) .. ',"status":' .. cjson.encode(ARGV[i + 3]) .. '}'
  end
end
redis.call('EXPIRE', KEYS[3], ARGV[5])
if ARGV[6] ~= '' and history_ttl > 0 and (#queued > 0 or ARGV[7] == '1') then
  local outcome = 'duplicate'
  if #queued > 0 then outcome = 'accepted' end
  remember(ARGV[6] .. ',"outcome":"' .. outcome .. '","queued":[' .. table.concat(items, ',') .. ']}')
  if ARGV[8] ~= '' then  -- the merchant order number's orders, comma-separated (a string: the smallest key)
    local known = redis.call('GET', ARGV[8])
    if not known then
      redis.call('SET', ARGV[8], order_id, 'EX', history_ttl)
    else
      if #known < 4096 and not string.find(',' .. known .. ',', ',' .. order_id .. ',', 1, true) then
        redis.call('APPEND', ARGV[8], ',' .. order_id)
      end
      redis.call('EXPIRE', ARGV[8], history_ttl)
    end
  end
end
return queued
"""

# KEYS[3] delivery record, KEYS[4] retry schedule. ARGV[5] update id, ARGV[6] dead-letter entry ('' when
# delivered), ARGV[7] the attempt's history entry ('' for none), then pairs of metrics field and amount.
# Ends an update, counts it in the shared metrics (once: an attempt's delivery record is what the
# metrics are counted against) and, when it is its order's head, moves the chain on. Not the head means
# it ran again after it was finished: the chain has moved on.
FINISH = """
local id, entry = ARGV[5], ARGV[6]
if redis.call('DEL', KEYS[3]) == 1 then
  for i = 8, #ARGV, 2 do redis.call('HINCRBYFLOAT', metrics, ARGV[i], ARGV[i + 1]) end
  if ARGV[7] ~= '' then remember(ARGV[7]) end
end
redis.call('ZREM', KEYS[4], id)
redis.call('HDEL', pending, id)
if entry ~= '' then redis.call('HSET', dead_letters, id, entry) end
if redis.call('GET', head) ~= id then return {''} end
return {advance(), unpack(deleted)}
"""

# A head whose job is gone (deleted from outside) is dead-lettered and its order moves on; a missing
# head with updates waiting is released the same way.
RELEASE_STALE = """
local id = redis.call('GET', head)
if id then
  if redis.call('EXISTS', job_prefix .. id) == 1 then return {''} end
  dead_letter_deleted(id)
elseif redis.call('LLEN', waiting) == 0 then
  redis.call('SREM', active, order_id)
  return {''}
end
return {advance(), unpack(deleted)}
"""

# KEYS[3] the job, KEYS[4] delivery record, KEYS[5] RQ's FailedJobRegistry. ARGV[5] update id, ARGV[6]
# the update (JSON). Takes a dead-lettered update out of the dead-letter queue (and RQ's failed jobs)
# and back into its order's chain with the same id. Returns 0 when it was not dead-lettered.
REQUEUE = """
local id = ARGV[5]
if redis.call('HDEL', dead_letters, id) == 0 then return 0 end
redis.call('DEL', KEYS[4])
redis.call('ZREM', KEYS[5], id)
redis.call('PERSIST', KEYS[3])
redis.call('HDEL', KEYS[3], 'exc_info')
join(id, ARGV[6])
remember('{"kind":"requeue","at":' .. cjson.encode(now_text) .. ',"update":' .. short(id) .. '}')
return 1
"""

# KEYS: retry schedule, delivery record, metrics, the order's history. ARGV: update id, due time, error,
# error time, the attempt's history entry ('' for none), the history's TTL, then pairs of metrics field
# and amount. The job itself goes to RQ's ScheduledJobRegistry as RQ records the attempt's Retry
# (workers/delivery.py).
SCHEDULE_RETRY = """
redis.call('ZADD', KEYS[1], ARGV[2], ARGV[1])
redis.call('HSET', KEYS[2], 'last_error', ARGV[3], 'last_error_at', ARGV[4])
for i = 7, #ARGV, 2 do redis.call('HINCRBYFLOAT', KEYS[3], ARGV[i], ARGV[i + 1]) end
if ARGV[5] ~= '' and tonumber(ARGV[6]) > 0 then
  redis.call('RPUSH', KEYS[4], ARGV[5])
  redis.call('EXPIRE', KEYS[4], ARGV[6])
end
return 1
"""

# KEYS: retry schedule, RQ's ScheduledJobRegistry, queue, RQ queue set. ARGV: now (Unix), job prefix,
# now (RQ format), limit.
# Queues the updates whose retry is due, to the microsecond (RQ's own scheduler, if one runs, keeps
# whole seconds and would queue them up to a second later). Only a job RQ recorded as scheduled moves;
# one still `started` is the attempt that scheduled the retry, not yet recorded by RQ. Any other state
# (queued by RQ's scheduler, deleted) leaves the schedule. Returns the number moved and the next due time.
MOVE_DUE = """
local schedule, registry, queue = KEYS[1], KEYS[2], KEYS[3]
local now, job_prefix, stamp, limit = ARGV[1], ARGV[2], ARGV[3], tonumber(ARGV[4])
local moved = 0
for _, id in ipairs(redis.call('ZRANGEBYSCORE', schedule, '-inf', now, 'LIMIT', 0, limit)) do
  local job = job_prefix .. id
  local status = redis.call('HGET', job, 'status')
  if status == 'scheduled' then
    redis.call('ZREM', schedule, id)
    redis.call('ZREM', registry, id)
    redis.call('HSET', job, 'status', 'queued', 'enqueued_at', stamp)
    redis.call('RPUSH', queue, id)
    moved = moved + 1
  elseif status ~= 'started' then
    redis.call('ZREM', schedule, id)
  end
end
if moved > 0 then redis.call('SADD', KEYS[4], queue) end
local first = redis.call('ZRANGE', schedule, 0, 0, 'WITHSCORES')
return {moved, first[2] or ''}
"""

# KEYS: retry schedule, RQ's ScheduledJobRegistry, queue, RQ queue set. ARGV: update id, now (Unix), job
# prefix, now (RQ format).
# Ops' "retry now": one update waiting for its next attempt is made due at once, by MOVE_DUE's rules, in
# one step (schedule, registry, job and queue must agree). A job RQ recorded as scheduled is queued now;
# one still `started` (the attempt that scheduled the retry is being recorded) is made due now, and the
# next sweep queues it; any other state leaves the schedule, as MOVE_DUE does. Returns 1 queued, 2 due,
# 0 when the update was not waiting for a retry.
RETRY_NOW = """
local schedule, registry, queue = KEYS[1], KEYS[2], KEYS[3]
local id, now, job_prefix, stamp = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
if not redis.call('ZSCORE', schedule, id) then return 0 end
local job = job_prefix .. id
local status = redis.call('HGET', job, 'status')
if status == 'scheduled' then
  redis.call('ZREM', schedule, id)
  redis.call('ZREM', registry, id)
  redis.call('HSET', job, 'status', 'queued', 'enqueued_at', stamp)
  redis.call('RPUSH', queue, id)
  redis.call('SADD', KEYS[4], queue)
  return 1
elseif status == 'started' then
  redis.call('ZADD', schedule, 'XX', now, id)
  return 2
end
redis.call('ZREM', schedule, id)
return 0
"""


def chain_script(keys: RedisKeys, body: str, history_ttl: int = 0) -> str:
    """PRELUDE with this deployment's names (and the history's TTL, 0 for none) written in, then `body`."""
    names: dict[str, str | bytes] = {
        "QUEUE": keys.rq_queue,
        "QUEUES": QUEUES_KEY,
        "ACTIVE": keys.active_orders,
        "DEFERRED": keys.rq_deferred,
        "PENDING": keys.pending_updates,
        "DEAD_LETTERS": keys.dead_letters,
        "METRICS": keys.metrics,
        "JOB_PREFIX": JOB_PREFIX,
        "DELIVERY_PREFIX": keys.delivery(""),
        "DATA_HEAD": JOB_DATA_HEAD,
        "DATA_TAIL": JOB_DATA_TAIL,
        "REASON": '"' + DELETED_OUTSIDE + '"',  # as a JSON string
        "DEAD_LETTERED_FIELD": DEAD_LETTERED[0],
        "HISTORY_PREFIX": keys.history(""),
    }
    text = PRELUDE
    for name, value in names.items():
        text = text.replace("{" + name + "}", lua_string(value))
    fields = ", ".join(lua_string(x) for x in template_args(keys.queue_name))
    text = text.replace("{HISTORY_TTL}", str(int(history_ttl)))
    return text.replace("{FIELDS}", "{" + fields + "}") + body


def chain_args(order_id: str, stamp: str | None = None) -> list[Any]:
    """ARGV[1..4] of every chain script."""
    return [order_id, stamp or rq_timestamp(), repr(time.time()), utc_now()]


class OrderChains:
    """The scripts above, bound to one Redis client and the product's keys."""

    def __init__(self, redis: Redis, keys: RedisKeys, history_ttl: int = 0) -> None:
        self.redis = redis
        self.keys = keys
        self.history_ttl = history_ttl
        self._finish = redis.register_script(chain_script(keys, FINISH, history_ttl))
        self._release_stale = redis.register_script(chain_script(keys, RELEASE_STALE, history_ttl))
        self._requeue = redis.register_script(chain_script(keys, REQUEUE, history_ttl))
        self._schedule = redis.register_script(SCHEDULE_RETRY)
        self._move_due = redis.register_script(MOVE_DUE)
        self._retry_now = redis.register_script(RETRY_NOW)

    def _chain_keys(self, order_id: str) -> list[str]:
        return [self.keys.order_head(order_id), self.keys.order_waiting(order_id)]

    def finish(
        self,
        update: dict[str, Any],
        dead_letter_entry: bytes = b"",
        counters: Iterable[tuple[str, float]] = (),
        history: bytes = b"",
    ) -> str | None:
        """End the update (delivered, or dead-lettered with its entry) and add `counters` (metrics hash
        field, amount) and the attempt's `history` entry in the same step; returns the order's next head."""
        k = self.keys
        keys = [*self._chain_keys(update["order_id"]), k.delivery(update["id"]), k.retry_schedule]
        args = [*chain_args(update["order_id"]), update["id"], dead_letter_entry, history]
        for field, amount in counters:
            args += (field, repr(amount))
        return self._moved_on(update["order_id"], self._finish(keys=keys, args=args))

    def schedule_retry(
        self,
        update: dict[str, Any],
        due: float,
        error: str,
        error_at: str,
        counters: Iterable[tuple[str, float]],
        history: bytes = b"",
    ) -> None:
        k = self.keys
        args: list[Any] = [update["id"], repr(due), error, error_at, history, self.history_ttl]
        for field, amount in counters:
            args += (field, repr(amount))
        keys = [k.retry_schedule, k.delivery(update["id"]), k.metrics, k.history(update["order_id"])]
        self._schedule(keys=keys, args=args)

    def move_due(self, limit: int = 500) -> tuple[int, float | None]:
        """Queue the updates whose retry is due; returns how many, and when the next one is due."""
        k = self.keys
        moved, first = self._move_due(
            keys=[k.retry_schedule, k.rq_scheduled, k.rq_queue, QUEUES_KEY],
            args=[repr(time.time()), JOB_PREFIX, rq_timestamp(), limit],
        )
        first = _text(first)
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

    def release_stale_heads(self) -> int:
        """Sweep the orders that have a head; dead-letter heads whose job was deleted from outside and
        move their orders on. Returns how many orders moved. Each order is its own script run; a batch
        of them goes in one pipeline (one round trip)."""
        k = self.keys
        released = 0
        cursor = None
        while cursor != 0:
            cursor, batch = self.redis.sscan(k.active_orders, cursor or 0, count=500)
            if not batch:
                continue
            order_ids = [_text(raw) or "" for raw in batch]
            with self.redis.pipeline(transaction=False) as pipe:
                for order_id in order_ids:
                    self._release_stale(
                        keys=self._chain_keys(order_id), args=chain_args(order_id), client=pipe
                    )
                answers = pipe.execute()
            for order_id, answer in zip(order_ids, answers, strict=True):
                if len(answer) > 1 or _text(answer[0]):
                    released += 1
                self._moved_on(order_id, answer)
        return released

    def requeue(self, update: dict[str, Any], update_json: bytes) -> bool:
        """Put a dead-lettered update back into its order's chain; False when it was not dead-lettered."""
        k = self.keys
        keys = [
            *self._chain_keys(update["order_id"]), k.rq_job(update["id"]), k.delivery(update["id"]), k.rq_failed,
        ]  # fmt: skip
        args = [*chain_args(update["order_id"]), update["id"], update_json]
        return bool(self._requeue(keys=keys, args=args))

    def _moved_on(self, order_id: str, answer: list[Any]) -> str | None:
        """The next head from a chain script's answer; logs the updates it dead-lettered because their
        job had been deleted from outside."""
        for raw in answer[1:]:
            log.warning(
                "update dead-lettered: its RQ job was deleted outside intergiro-receiver",
                update=_text(raw),
                order=order_id,
                reason=DELETED_OUTSIDE,
            )
        return _text(answer[0]) or None


def intake_script(keys: RedisKeys, history_ttl: int = 0) -> str:
    """The intake's dedup and join, for receiver/intake.py (KEYS: head, waiting, seen)."""
    return chain_script(keys, INTAKE, history_ttl)


def _text(value: Any) -> str | None:
    if value is None or value is False:
        return None
    return value.decode() if isinstance(value, bytes) else str(value)

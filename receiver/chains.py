"""Per-order chains (join, advance, requeue) and the retry schedule, each change one Lua script.

The receiver queues only an order's first undelivered update (its "head"); the others wait in the
order's list (see receiver/intake.py). Here the workers move the chain on: when the head is finished
(delivered or dead-lettered) the next waiting update becomes the head and goes on the RQ queue. A
retrying update stays head, so the order's later updates wait for it. Every script below changes
several keys that must agree (head, waiting list, queue, job hash, schedule), so each is atomic: a
worker dying between two commands would otherwise lose an update or block its order.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import Any

from redis import Redis

from receiver.rediskeys import RedisKeys
from receiver.rqstore import JOB_PREFIX as RQ_JOB_PREFIX
from receiver.rqstore import QUEUES_KEY as RQ_QUEUES
from receiver.rqstore import rq_timestamp, template_args

# Shared by the scripts that end a head: make the next waiting update (whose job still exists) the head
# and queue it, or, when none waits, delete the head. Expects head, waiting, queue, active, order_id,
# job_prefix, now in scope. Job keys are built here from ARGV's prefix: fine on one Redis server (the
# product does not support Redis Cluster, where every key would have to be declared).
ADVANCE = """
local function advance()
  while true do
    local next_id = redis.call('LPOP', waiting)
    if not next_id then
      redis.call('DEL', head)
      redis.call('SREM', active, order_id)
      return false
    end
    local job = job_prefix .. next_id
    if redis.call('EXISTS', job) == 1 then
      redis.call('SET', head, next_id)
      redis.call('SADD', active, order_id)
      redis.call('HSET', job, 'status', 'queued', 'enqueued_at', now)
      redis.call('RPUSH', queue, next_id)
      return next_id
    end
  end
end
"""

# KEYS: head, waiting, queue, active orders, delivery record, retry schedule, retry jobs, dead letters,
# metrics. ARGV: update id, order id, job prefix, now, dead-letter entry ('' when delivered), then pairs
# of metrics field and amount.
# Ends an update (delivered, or dead-lettered with its entry), counts it in the shared metrics (once: an
# attempt's delivery record is what the metrics are counted against) and, when it is its order's head,
# moves the chain on. Not the head means it ran again after it was finished: the chain has moved on.
FINISH = (
    """
local head, waiting, queue, active = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local id, order_id, job_prefix, now, entry = ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5]
"""
    + ADVANCE
    + """
if redis.call('DEL', KEYS[5]) == 1 then  -- counted once per attempt, however often it is finished
  for i = 6, #ARGV, 2 do redis.call('HINCRBYFLOAT', KEYS[9], ARGV[i], ARGV[i + 1]) end
end
redis.call('ZREM', KEYS[6], id)
redis.call('HDEL', KEYS[7], id)
if entry ~= '' then redis.call('HSET', KEYS[8], id, entry) end
if redis.call('GET', head) ~= id then return false end
return advance()
"""
)

# KEYS: retry schedule, retry jobs, delivery record. ARGV: update id, due time, job data, error, error time.
# The schedule entry and the job data it needs are written together, so a due update always has its job.
SCHEDULE_RETRY = """
redis.call('ZADD', KEYS[1], ARGV[2], ARGV[1])
redis.call('HSET', KEYS[2], ARGV[1], ARGV[3])
redis.call('HSET', KEYS[3], 'last_error', ARGV[4], 'last_error_at', ARGV[5])
return 1
"""

# KEYS: retry schedule, retry jobs, queue, RQ queue set. ARGV: now (Unix), job prefix, now (RQ format),
# limit, template fields*2, template...
# Moves due updates back onto the RQ queue (same job id, so the update stays its order's head). A job
# still `started` is the attempt that scheduled the retry, not yet finished by RQ (which deletes the hash
# when it is done); `queued` means RQ already re-queued it after a worker crash: both are left alone.
# Returns the number moved and the next due time ('' when nothing is scheduled).
MOVE_DUE = """
local schedule, jobs, queue = KEYS[1], KEYS[2], KEYS[3]
local now, job_prefix, stamp, limit = ARGV[1], ARGV[2], ARGV[3], tonumber(ARGV[4])
local fields = {}
for i = 5, #ARGV do fields[#fields + 1] = ARGV[i] end
local moved = 0
for _, id in ipairs(redis.call('ZRANGEBYSCORE', schedule, '-inf', now, 'LIMIT', 0, limit)) do
  local job = job_prefix .. id
  local status = redis.call('HGET', job, 'status')
  if status ~= 'started' and status ~= 'queued' then
    local data = redis.call('HGET', jobs, id)
    redis.call('ZREM', schedule, id)
    redis.call('HDEL', jobs, id)
    if data then
      redis.call('HSET', job, 'data', data, 'status', 'queued', 'created_at', stamp, 'enqueued_at', stamp,
        'description', 'deliver_update(' .. id .. ')', unpack(fields))
      redis.call('RPUSH', queue, id)
      moved = moved + 1
    end
  end
end
if moved > 0 then redis.call('SADD', KEYS[4], queue) end
local first = redis.call('ZRANGE', schedule, 0, 0, 'WITHSCORES')
return {moved, first[2] or ''}
"""

# KEYS: head, waiting, queue, active orders, retry schedule. ARGV: order id, job prefix, now.
# A head whose job is gone (purged, deleted by hand) and that is not scheduled for a retry would block
# its order forever: release it. A missing head with updates waiting is released the same way.
RELEASE_STALE = (
    """
local head, waiting, queue, active = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local order_id, job_prefix, now = ARGV[1], ARGV[2], ARGV[3]
"""
    + ADVANCE
    + """
local id = redis.call('GET', head)
if id then
  if redis.call('EXISTS', job_prefix .. id) == 1 or redis.call('ZSCORE', KEYS[5], id) then return false end
elseif redis.call('LLEN', waiting) == 0 then
  redis.call('SREM', active, order_id)
  return false
end
return advance()
"""
)

# KEYS: head, waiting, queue, RQ queue set, active orders, job, dead letters, delivery record.
# ARGV: update id, order id, job data, now (RQ format), template fields*2, template...
# Takes an update out of the dead-letter queue and back into its order's chain, with the same id: queued
# at once when the order has no head, otherwise behind whatever waits. Returns 0 when it was not there.
REQUEUE = """
local head, waiting, queue, queues, active, job = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[6]
local id, order_id, data, stamp = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
local fields = {}
for i = 5, #ARGV do fields[#fields + 1] = ARGV[i] end
if redis.call('HDEL', KEYS[7], id) == 0 then return 0 end
redis.call('DEL', KEYS[8])
local status = 'deferred'
local current = redis.call('GET', head)
if not current or current == id then
  redis.call('SET', head, id)
  redis.call('SADD', active, order_id)
  redis.call('RPUSH', queue, id)
  status = 'queued'
else
  redis.call('RPUSH', waiting, id)
end
redis.call('HSET', job, 'data', data, 'status', status, 'created_at', stamp, 'enqueued_at', stamp,
  'description', 'deliver_update(' .. id .. ')', unpack(fields))
redis.call('SADD', queues, queue)
return 1
"""


class OrderChains:
    """The scripts above, bound to one Redis client and the product's keys."""

    def __init__(self, redis: Redis, keys: RedisKeys) -> None:
        self.redis = redis
        self.keys = keys
        self._fields = template_args(keys.queue_name)
        self._finish = redis.register_script(FINISH)
        self._schedule = redis.register_script(SCHEDULE_RETRY)
        self._move_due = redis.register_script(MOVE_DUE)
        self._release_stale = redis.register_script(RELEASE_STALE)
        self._requeue = redis.register_script(REQUEUE)

    def _chain_keys(self, order_id: str) -> list[str]:
        k = self.keys
        return [k.order_head(order_id), k.order_waiting(order_id), k.rq_queue, k.active_orders]

    def _finish_keys_args(
        self, update: dict[str, Any], entry: bytes, counters: Iterable[tuple[str, float]]
    ) -> tuple[list[str], list[Any]]:
        k = self.keys
        keys = [
            *self._chain_keys(update["order_id"]),
            k.delivery(update["id"]), k.retry_schedule, k.retry_jobs, k.dead_letters, k.metrics,
        ]  # fmt: skip
        args = [update["id"], update["order_id"], RQ_JOB_PREFIX, rq_timestamp(), entry]
        for field, amount in counters:
            args += (field, repr(amount))
        return keys, args

    def finish(
        self,
        update: dict[str, Any],
        dead_letter_entry: bytes = b"",
        counters: Iterable[tuple[str, float]] = (),
    ) -> str | None:
        """End the update (delivered, or dead-lettered with its entry) and add `counters` (metrics hash
        field, amount) in the same step; returns the order's next head."""
        keys, args = self._finish_keys_args(update, dead_letter_entry, counters)
        return _text(self._finish(keys=keys, args=args))

    def finish_in(
        self, transaction: Any, update: dict[str, Any], counters: Iterable[tuple[str, float]]
    ) -> None:
        """Queue the end of a delivered update (as `finish`) on someone else's transaction. By the
        script's text: a script whose SHA Redis forgot cannot be loaded again inside a transaction."""
        keys, args = self._finish_keys_args(update, b"", counters)
        transaction.execute_command("EVAL", FINISH, len(keys), *keys, *args)

    def schedule_retry(self, update_id: str, due: float, job_data: bytes, error: str, error_at: str) -> None:
        k = self.keys
        self._schedule(
            keys=[k.retry_schedule, k.retry_jobs, k.delivery(update_id)],
            args=[update_id, repr(due), job_data, error, error_at],
        )

    def move_due(self, limit: int = 500) -> tuple[int, float | None]:
        """Queue the updates whose retry is due; returns how many, and when the next one is due."""
        k = self.keys
        moved, first = self._move_due(
            keys=[k.retry_schedule, k.retry_jobs, k.rq_queue, RQ_QUEUES],
            args=[repr(time.time()), RQ_JOB_PREFIX, rq_timestamp(), limit, *self._fields],
        )
        first = _text(first)
        return int(moved), float(first) if first else None

    def release_stale_heads(self) -> int:
        """Sweep the orders that have a head; release those whose head's job is gone. Returns how many.
        Each order is its own script run; a batch of them goes in one pipeline (one round trip)."""
        k = self.keys
        released = 0
        cursor = None
        while cursor != 0:
            cursor, batch = self.redis.sscan(k.active_orders, cursor or 0, count=500)
            if not batch:
                continue
            with self.redis.pipeline(transaction=False) as pipe:
                for raw in batch:
                    order_id = _text(raw) or ""
                    keys = [*self._chain_keys(order_id), k.retry_schedule]
                    self._release_stale(
                        keys=keys, args=[order_id, RQ_JOB_PREFIX, rq_timestamp()], client=pipe
                    )
                released += sum(1 for answer in pipe.execute() if answer)
        return released

    def requeue(self, update: dict[str, Any], job_data: bytes) -> bool:
        """Put a dead-lettered update back into its order's chain; False when it was not dead-lettered."""
        k = self.keys
        keys = [
            *self._chain_keys(update["order_id"])[:3], RQ_QUEUES, k.active_orders, k.rq_job(update["id"]),
            k.dead_letters, k.delivery(update["id"]),
        ]  # fmt: skip
        args = [update["id"], update["order_id"], job_data, rq_timestamp(), *self._fields]
        return bool(self._requeue(keys=keys, args=args))


def _text(value: Any) -> str | None:
    if value is None or value is False:
        return None
    return value.decode() if isinstance(value, bytes) else str(value)

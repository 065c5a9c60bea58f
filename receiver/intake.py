"""Dedup and enqueue as ONE atomic Redis step: remember the order's new events and write their RQ jobs.

A Lua script runs alone on the Redis server, so a marker is never written without its job (or a job
without its marker), and fifty concurrent deliveries of one token queue each event exactly once.
The answer is sent only after the script returned, so a 200 always means "in Redis".
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

import orjson
from redis.asyncio import Redis

from receiver.order import event_key
from receiver.rediskeys import RQ_QUEUES, RedisKeys
from workers.jobs import DELIVER_UPDATE, job_hash_template

# KEYS: seen hash, order head, order waiting list, RQ queue, RQ queue set, active orders set, then one RQ
# job key per update.
# ARGV: dedup TTL, created_at, order id, n template fields*2, template..., then per update: event key, id,
# data.
# Per order, only the first undelivered update is pushed to the RQ queue (the "head"); the others wait
# in event order and the worker that finishes the head pushes the next, so one order's updates reach
# the merchant in sequence however many workers run.
INTAKE_SCRIPT = """
local seen, head, waiting, queue, queues, active = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[6]
local ttl, created_at, order_id, nfields = ARGV[1], ARGV[2], ARGV[3], tonumber(ARGV[4])
local fields = {}
for i = 1, nfields do fields[i] = ARGV[4 + i] end
local first = 5 + nfields
local queued = {}
local n = (#ARGV - first + 1) / 3
for i = 0, n - 1 do
  local ek, id, data = ARGV[first + 3 * i], ARGV[first + 3 * i + 1], ARGV[first + 3 * i + 2]
  if redis.call('HSETNX', seen, ek, 1) == 1 then
    local status = 'deferred'
    if redis.call('SET', head, id, 'NX') then
      redis.call('RPUSH', queue, id)
      redis.call('SADD', active, order_id)
      status = 'queued'
    else
      redis.call('RPUSH', waiting, id)
    end
    redis.call('HSET', KEYS[7 + i], 'data', data, 'status', status, 'created_at', created_at,
      'enqueued_at', created_at, 'description', 'deliver_update(' .. id .. ')', unpack(fields))
    queued[#queued + 1] = id
  end
end
redis.call('EXPIRE', seen, ttl)
if #queued > 0 then redis.call('SADD', queues, queue) end
return queued
"""


def rq_timestamp(moment: datetime | None = None) -> str:
    """RQ's own timestamp format, for the job fields the script writes."""
    return (moment or datetime.now(UTC)).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def job_data(update: dict[str, Any]) -> bytes:
    """The job's `data` as RQ's JSON serializer reads it: [function, instance, args, kwargs]."""
    return orjson.dumps([DELIVER_UPDATE, None, [update], {}])


class Intake:
    """Stores new updates of one order atomically; shared by the HTTP receiver and reconcile."""

    def __init__(self, redis: Redis, keys: RedisKeys, dedup_ttl_seconds: int) -> None:
        self.redis = redis
        self.keys = keys
        self.ttl = dedup_ttl_seconds
        self._script = redis.register_script(INTAKE_SCRIPT)
        template = job_hash_template(keys.queue_name)
        self._fields = [str(len(template) * 2), *(x for pair in template.items() for x in pair)]

    async def store(self, updates: Sequence[dict[str, Any]]) -> list[str]:
        """Queue the updates (all of one order) whose event is new; returns the ids queued now."""
        if not updates:
            return []
        order_id = updates[0]["order_id"]
        keys = [
            self.keys.seen(order_id),
            self.keys.order_head(order_id),
            self.keys.order_waiting(order_id),
            self.keys.rq_queue,
            RQ_QUEUES,
            self.keys.active_orders,
            *(self.keys.rq_job(u["id"]) for u in updates),
        ]
        args: list[Any] = [self.ttl, rq_timestamp(), order_id, *self._fields]
        for update in updates:
            args += [
                event_key(update["event"]["sequence"], update["event"]["type"]),
                update["id"],
                job_data(update),
            ]
        queued = await self._script(keys=keys, args=args)
        return [q.decode() if isinstance(q, bytes) else str(q) for q in queued]

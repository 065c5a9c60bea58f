"""Per-order chains: join, advance, requeue, replay, drop. Each change is one Lua script.

An order's first unfinished update is its "head", the only one of the order on the RQ queue (or, while
it waits for a retry, in RQ's ScheduledJobRegistry); the others wait in event order in the order's list
and in RQ's DeferredJobRegistry. When the head is finished (delivered or dead-lettered) the next waiting
update becomes the head and goes on the queue. Every script changes several keys that must agree (head,
waiting list, queue, registries, job hash), so each is atomic: a process dying between two commands
would otherwise lose an update or block its order.

The fragments (join, advance, dead-lettering a job deleted from outside) are written once, in PRELUDE,
and every script that changes a chain starts with it, after the fragments of the records it writes
(receiver.history's entry, receiver.deadletters' entry). The retry schedule is receiver.retries'. Keys that are the same for every order are
written into the scripts' text: the product runs on one Redis server (not Redis Cluster).

Chains are per destination (receiver/destinations.py): an OrderChains is bound to one destination's
keys, and its chain members are that destination's job ids (`<update id>__<name>`; the update id itself
for `merchant`). The intake joins, in its one step, the chain of every destination the update matches.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from typing import Any

import orjson
from redis import Redis
from redis.client import Pipeline

from receiver.clock import utc_now
from receiver.deliveries import LUA as DELIVERY_RECORD_LUA
from receiver.destinations import MERCHANT
from receiver.history import (
    DELETED_OUTSIDE_REASON,
    DESTINATION_REMOVED_REASON,
    destination_field,
    lua_entries,
    lua_write,
)
from receiver.logs import log
from receiver.metrics.shared import counter_increment
from receiver.rediskeys import RedisKeys
from receiver.redistext import text
from receiver.rqstore import (
    JOB_DATA_HEAD,
    JOB_DATA_TAIL,
    JOB_PREFIX,
    QUEUES_KEY,
    lua_string,
    rq_timestamp,
    template_args,
)

# KEYS[1] the order's head, KEYS[2] its waiting list; ARGV[1] order id, ARGV[2] now in RQ's format,
# ARGV[3] now in Unix seconds, ARGV[4] now as the product writes it. The {NAMES} are filled in once;
# the history's and the dead-letter queue's fragments (receiver.history, receiver.deadletters) come
# before it.
PRELUDE = """
local queue, queues, active, deferred = {QUEUE}, {QUEUES}, {ACTIVE}, {DEFERRED}
local pending, metrics = {PENDING}, {METRICS}
local job_prefix, delivery_prefix = {JOB_PREFIX}, {DELIVERY_PREFIX}
local fields = {FIELDS}
local deleted = {}
local retry_schedule, scheduled = {RETRY_SCHEDULE}, {SCHEDULED}
-- the RQ job meta the intake writes with each job it makes ('' for none: receiver/tracing.py's context)
local job_meta = ''

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
  if job_meta ~= '' then redis.call('HSET', job_prefix .. id, 'meta', job_meta) end
  redis.call('SADD', queues, queue)
  return status
end

-- An unfinished update goes to the dead-letter queue from the copy in `pending`, with `reason`, never
-- silently away; the history tells it as `kind`.
local function dead_letter_pending(id, reason, kind)
  local update = redis.call('HGET', pending, id)
  if not update then return end
  local record = delivery_prefix .. id
  dead_letter(id, update, attempts_so_far(record), reason)
  redis.call('HDEL', pending, id)
  redis.call('DEL', record)
  redis.call('HINCRBYFLOAT', metrics, {DEAD_LETTERED_FIELD}, 1)
  remember(update_entry(kind, id))
end

-- An update whose RQ job was deleted from outside (rq-dashboard, `rq empty`, Job.delete()) is
-- dead-lettered with the reason; the caller logs its id.
local function dead_letter_deleted(id)
  deleted[#deleted + 1] = id
  dead_letter_pending(id, deleted_outside_reason, kind_deleted_outside)
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

# The locals every chain script starts with (the fragments use them).
ARGS = """
local head, waiting = KEYS[1], KEYS[2]
local order_id, stamp, now, now_text = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
-- the destination's job id suffix ('' for merchant)
local suffix = {SUFFIX}
"""

# KEYS[1], KEYS[2] the order's head and waiting list in the first destination's chain, KEYS[3] the order's
# seen hash, then head and waiting list in each further destination's chain. ARGV[5] the seen hash's
# TTL; ARGV[6] the history entry's start ('' for none: a JSON object without its closing brace, completed
# here with `outcome` and `queued`); ARGV[7] '1' to write it even when nothing was queued (a callback,
# not a reconcile run); ARGV[8] the merchant order number's index key ('' for none); ARGV[9] the jobs' RQ
# meta (JSON, '' for none: the callback's trace context, receiver/tracing.py); then per update:
# event key, id, update (JSON), status, and the destinations it goes to ('1' at the index of each).
# Dedup and fan-out in one step: a marker is never written without the jobs of every destination the
# update matches, nor a job without its marker: no destination can miss an update another got.
INTAKE = """
local queued, items = {}, {}
local targets = {TARGETS}  -- per destination: queue, active orders, deferred registry, job fields, ...
local function use(n)
  if n == 1 then head, waiting = KEYS[1], KEYS[2] else head, waiting = KEYS[2 * n], KEYS[2 * n + 1] end
  local t = targets[n]
  queue, active, deferred, fields, suffix, history_destination = t[1], t[2], t[3], t[4], t[5], t[6]
end
job_meta = ARGV[9]
for i = 10, #ARGV, 5 do
  if redis.call('HSETNX', KEYS[3], ARGV[i], 1) == 1 then
    local wanted = ARGV[i + 4]
    for n = 1, #targets do
      if string.sub(wanted, n, n) == '1' then
        use(n)
        join(ARGV[i + 1] .. suffix, ARGV[i + 2])
      end
    end
    queued[#queued + 1] = ARGV[i + 1]
    items[#items + 1] = queued_item(ARGV[i + 1], ARGV[i + 3])
  end
end
redis.call('EXPIRE', KEYS[3], ARGV[5])
if ARGV[6] ~= '' and history_ttl > 0 and (#queued > 0 or ARGV[7] == '1') then
  local outcome = duplicate
  if #queued > 0 then outcome = accepted end
  remember(queued_entry(ARGV[6], items, outcome))
  if ARGV[8] ~= '' then index_number(ARGV[8]) end
end
return queued
"""

# KEYS[3] delivery record, KEYS[4] retry schedule, KEYS[5] (a stream destination's delivery only) its
# stream. ARGV[5] update id, ARGV[6] dead-letter entry ('' when delivered), ARGV[7] the attempt's history
# entry ('' for none), ARGV[8] the stream's MAXLEN ('' for no stream), ARGV[9..12] the stream entry's
# update id, update (JSON), event type and status, then pairs of metrics field and amount.
# Ends an update, counts it in the shared metrics (once: an attempt's delivery record is what the
# metrics are counted against) and, when it is its order's head, moves the chain on. Not the head means
# it ran again after it was finished: the chain has moved on. A stream destination's update is appended
# to its stream in this same step (once: with the count), so a crash never appends it twice or skips it.
FINISH = """
local id, entry = ARGV[5], ARGV[6]
if redis.call('DEL', KEYS[3]) == 1 then
  for i = 13, #ARGV, 2 do redis.call('HINCRBYFLOAT', metrics, ARGV[i], ARGV[i + 1]) end
  if ARGV[7] ~= '' then remember(ARGV[7]) end
  if ARGV[8] ~= '' and entry == '' then
    redis.call('XADD', KEYS[5], 'MAXLEN', '~', ARGV[8], '*', 'id', ARGV[9], 'order_id', order_id,
      'event', ARGV[11], 'status', ARGV[12], 'update', ARGV[10])
  end
end
redis.call('ZREM', KEYS[4], id)
redis.call('HDEL', pending, id)
if entry ~= '' then store_dead_letter(id, entry) end
if redis.call('GET', head) ~= id then return {''} end
return {advance(), unpack(deleted)}
"""

# A head whose job is gone (deleted from outside) is dead-lettered and its order moves on; a missing
# head with updates waiting is released the same way.
# A head RQ holds as a scheduled retry that the retry schedule no longer has, and that is not queued
# either, would never be queued again (RQ's scheduler does not run: the retries' sweep queues retries).
# Seen once in the chaos run (a retry due within milliseconds, around a Redis restart and a killed
# worker; RQ writes a retry's `scheduled` status before the rest of its record, and an attempt that
# starts takes the update out of the schedule). It is made due now, and the retries' sweep queues it.
RESCHEDULED = "~"
RELEASE_STALE = """
local id = redis.call('GET', head)
if id then
  if redis.call('EXISTS', job_prefix .. id) == 1 then
    if redis.call('HGET', job_prefix .. id, 'status') == 'scheduled'
        and not redis.call('ZSCORE', retry_schedule, id) and not redis.call('LPOS', queue, id) then
      redis.call('ZADD', retry_schedule, now, id)
      return {{RESCHEDULED} .. id}
    end
    return {''}
  end
  dead_letter_deleted(id)
elseif redis.call('LLEN', waiting) == 0 then
  redis.call('SREM', active, order_id)
  return {''}
end
return {advance(), unpack(deleted)}
""".replace("{RESCHEDULED}", lua_string(RESCHEDULED))

# Every unfinished delivery of the order is dead-lettered with ARGV[5] as its reason and taken off the
# queue and RQ's registries (the destination was removed from the configuration); the chain is gone.
DROP = """
local ids = redis.call('LRANGE', waiting, 0, -1)
local id = redis.call('GET', head)
if id then table.insert(ids, 1, id) end
for _, x in ipairs(ids) do
  redis.call('LREM', queue, 0, x)
  redis.call('ZREM', deferred, x)
  redis.call('ZREM', scheduled, x)
  redis.call('ZREM', retry_schedule, x)
  dead_letter_pending(x, ARGV[5], kind_destination_removed)
  redis.call('DEL', job_prefix .. x)
end
redis.call('DEL', head, waiting)
redis.call('SREM', active, order_id)
return #ids
"""

# KEYS[3] the job, KEYS[4] delivery record, KEYS[5] RQ's FailedJobRegistry. ARGV[5] update id, ARGV[6]
# the update (JSON). Takes a dead-lettered update out of the dead-letter queue (and RQ's failed jobs)
# and back into its order's chain with the same id, its attempts so far kept in its delivery record as
# `earlier_attempts`. Returns 0 when it was not dead-lettered.
REQUEUE = """
local id = ARGV[5]
local earlier = take_dead_letter(id)
if not earlier then return 0 end
redis.call('DEL', KEYS[4])
-- a fresh set of attempts; the earlier ones stay counted, so that its next dead letter says them all
keep_earlier_attempts(KEYS[4], earlier)
redis.call('ZREM', KEYS[5], id)
redis.call('PERSIST', KEYS[3])
redis.call('HDEL', KEYS[3], 'exc_info')
join(id, ARGV[6])
remember(update_entry(kind_requeue, id))
return 1
"""

# ARGV[5] the replay's history entry (a JSON object without its closing brace, completed here with the
# ids queued; '' for none), ARGV[6] '1' for a dry run, then per update: its job id for this destination
# and the update (JSON).
# A replay queues an update again for one destination, with its own job id (so the same webhook-id and
# Idempotency-Key), into its order's chain like a new one, marked as a replay on its delivery record;
# not an update still pending or dead-lettered there (`dlq requeue` is their way), and no dedup marker
# is read or written: the other destinations never see it. A dry run changes nothing and counts what
# a run would queue now.
REPLAY = """
local queued, dry = {}, ARGV[6] == '1'
for i = 7, #ARGV, 2 do
  local id = ARGV[i]
  if redis.call('EXISTS', job_prefix .. id) == 0 and redis.call('HEXISTS', pending, id) == 0
      and not is_dead_lettered(id) then
    if not dry then
      join(id, ARGV[i + 1])
      mark_replay(delivery_prefix .. id)
    end
    queued[#queued + 1] = replayed_item(id)
  end
end
if #queued > 0 and ARGV[5] ~= '' and not dry then remember(queued_entry(ARGV[5], queued)) end
return #queued
"""


def chain_script(keys: RedisKeys, body: str, history_ttl: int = 0) -> str:
    """The chain scripts' start (ARGS, the history's and the dead-letter queue's fragments, PRELUDE) with
    this deployment's names (and the history's TTL, 0 for none) written in, then `body`."""
    names: dict[str, str | bytes] = {
        "QUEUE": keys.rq_queue,
        "QUEUES": QUEUES_KEY,
        "ACTIVE": keys.active_orders,
        "DEFERRED": keys.rq_deferred,
        "PENDING": keys.pending_updates,
        "METRICS": keys.metrics,
        "JOB_PREFIX": JOB_PREFIX,
        "DELIVERY_PREFIX": keys.delivery(""),
        "DATA_HEAD": JOB_DATA_HEAD,
        "DATA_TAIL": JOB_DATA_TAIL,
        "DEAD_LETTERED_FIELD": _dead_lettered_field(keys.destination),
        "RETRY_SCHEDULE": keys.retry_schedule,
        "SCHEDULED": keys.rq_scheduled,
    }
    prelude = PRELUDE
    for name, value in names.items():
        prelude = prelude.replace("{" + name + "}", lua_string(value))
    fields = ", ".join(lua_string(x) for x in template_args(keys.queue_name))
    prelude = prelude.replace("{FIELDS}", "{" + fields + "}")
    # not at the top: receiver.deadletters' operations (requeue) import this module
    from receiver.deadletters import lua as dead_letter_lua

    start = ARGS.replace("{SUFFIX}", lua_string(keys.job_id("")))
    records = (
        lua_write(keys.history(""), history_ttl)
        + lua_entries(keys.destination)
        + dead_letter_lua(keys)
        + DELIVERY_RECORD_LUA
    )
    return start + records + prelude + body


def _dead_lettered_field(destination: str) -> str:
    labels = {} if destination == MERCHANT else {"destination": destination}
    return counter_increment("intergiro_deliveries_total", 1, outcome="dead_lettered", **labels)[0]


def chain_keys(keys: RedisKeys, order_id: str) -> list[str]:
    """The order's chain in one destination: its head and its waiting list (every chain script's KEYS[1]
    and KEYS[2])."""
    return [keys.order_head(order_id), keys.order_waiting(order_id)]


def read_head(client: Redis | Pipeline, keys: RedisKeys, order_id: str) -> Any:
    """The order's head (its job id as bytes, None when it has none); on a pipeline, queued."""
    return client.get(keys.order_head(order_id))


def read_chain(pipe: Pipeline, keys: RedisKeys, order_id: str) -> None:
    """Queue on `pipe` the reading of the order's chain: its head, then its waiting job ids in order."""
    read_head(pipe, keys, order_id)
    pipe.lrange(keys.order_waiting(order_id), 0, -1)


def read_pending(pipe: Pipeline, keys: RedisKeys, job_id: str) -> None:
    """Queue on `pipe` whether delivery `job_id` is unfinished (in `pending` since it joined its chain)."""
    pipe.hexists(keys.pending_updates, job_id)


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
        self._replay = redis.register_script(chain_script(keys, REPLAY, history_ttl))
        self._release_stale = redis.register_script(chain_script(keys, RELEASE_STALE, history_ttl))
        self._requeue = redis.register_script(chain_script(keys, REQUEUE, history_ttl))

    def _chain_keys(self, order_id: str) -> list[str]:
        return chain_keys(self.keys, order_id)

    def finish(
        self,
        update: dict[str, Any],
        dead_letter_entry: bytes = b"",
        counters: Iterable[tuple[str, float]] = (),
        history: bytes = b"",
        stream: tuple[str, int] | None = None,
    ) -> str | None:
        """End the update (delivered, or dead-lettered with its entry) and add `counters` (metrics hash
        field, amount) and the attempt's `history` entry in the same step; a delivered update of a stream
        destination (`stream`: its key and MAXLEN) is appended to it in that step too. Returns the
        order's next head."""
        k = self.keys
        job = k.job_id(update["id"])
        keys = [*self._chain_keys(update["order_id"]), k.delivery(job), k.retry_schedule]
        args = [*chain_args(update["order_id"]), job, dead_letter_entry, history]
        if stream is None:
            args += ["", "", "", "", ""]
        else:
            keys.append(stream[0])
            args += [stream[1], update["id"], orjson.dumps(update), update["event"]["type"], update["status"]]
        for field, amount in counters:
            args += (field, repr(amount))
        return self._moved_on(update["order_id"], self._finish(keys=keys, args=args))

    def replay(self, updates: list[dict[str, Any]], history: bytes = b"", dry_run: bool = False) -> int:
        """Queue `updates` (one order's, in sequence) again for this destination only, each marked as a
        replay, except those it still has pending or dead-lettered; `history`: the replay's entry,
        without its closing brace. Returns how many were queued (`dry_run`: would be, and nothing
        changes)."""
        order_id = updates[0]["order_id"]
        args: list[Any] = [*chain_args(order_id), history, "1" if dry_run else ""]
        for update in updates:
            args += [self.keys.job_id(update["id"]), orjson.dumps(update)]
        return int(self._replay(keys=self._chain_keys(order_id), args=args))

    def release_stale_heads(self) -> int:
        """Sweep the orders that have a head; dead-letter heads whose job was deleted from outside and
        move their orders on, and make due a head RQ holds as a scheduled retry that the retry schedule
        lost (RESCHEDULED). Returns how many orders moved. Each order is its own script run; a batch
        of them goes in one pipeline (one round trip)."""
        k = self.keys
        released = 0
        cursor = None
        while cursor != 0:
            cursor, batch = self.redis.sscan(k.active_orders, cursor or 0, count=500)
            if not batch:
                continue
            order_ids = [text(raw) for raw in batch]
            with self.redis.pipeline(transaction=False) as pipe:
                for order_id in order_ids:
                    self._release_stale(
                        keys=self._chain_keys(order_id), args=chain_args(order_id), client=pipe
                    )
                answers = pipe.execute()
            for order_id, answer in zip(order_ids, answers, strict=True):
                first = text(answer[0])
                if first.startswith(RESCHEDULED):
                    log.warning(
                        "a retry missing from the retry schedule was made due now",
                        update=first.removeprefix(RESCHEDULED),
                        order=order_id,
                    )
                    continue
                if len(answer) > 1 or first:
                    released += 1
                self._moved_on(order_id, answer)
        return released

    def requeue(self, update: dict[str, Any], update_json: bytes) -> bool:
        """Put a dead-lettered update back into its order's chain; False when it was not dead-lettered."""
        keys, args = self._requeue_call(update, update_json)
        return bool(self._requeue(keys=keys, args=args))

    def requeue_on(self, pipe: Pipeline, update: dict[str, Any], update_json: bytes) -> None:
        """`requeue`, queued on `pipe`: its answer (0: it was not dead-lettered) comes with the pipeline's."""
        keys, args = self._requeue_call(update, update_json)
        self._requeue(keys=keys, args=args, client=pipe)

    def _requeue_call(self, update: dict[str, Any], update_json: bytes) -> tuple[list[Any], list[Any]]:
        k = self.keys
        job = k.job_id(update["id"])
        keys = [*self._chain_keys(update["order_id"]), k.rq_job(job), k.delivery(job), k.rq_failed]
        return keys, [*chain_args(update["order_id"]), job, update_json]

    def drop_all(self, reason: str = DESTINATION_REMOVED_REASON) -> int:
        """Dead-letter every unfinished delivery of this destination with `reason` (it was removed from
        the configuration); returns how many. One script run per order, in pipelined batches."""
        k = self.keys
        dropped = 0
        script = self.redis.register_script(chain_script(k, DROP, self.history_ttl))
        while True:
            batch = [text(raw) for raw in self.redis.srandmember(k.active_orders, 500) or []]
            if not batch:
                break
            with self.redis.pipeline(transaction=False) as pipe:
                for order_id in batch:
                    script(keys=self._chain_keys(order_id), args=[*chain_args(order_id), reason], client=pipe)
                dropped += sum(int(n) for n in pipe.execute())
        # orders with a retry due or a job on the queue but no chain any more (none should be left)
        self.redis.delete(k.retry_schedule, k.rq_queue, k.rq_deferred, k.rq_scheduled)
        return dropped

    def _moved_on(self, order_id: str, answer: list[Any]) -> str | None:
        """The next head from a chain script's answer; logs the updates it dead-lettered because their
        job had been deleted from outside."""
        for raw in answer[1:]:
            log.warning(
                "update dead-lettered: its RQ job was deleted outside intergiro-receiver",
                update=text(raw),
                order=order_id,
                reason=DELETED_OUTSIDE_REASON,
            )
        return text(answer[0]) or None


def intake_script(keys: RedisKeys, history_ttl: int = 0, destinations: Sequence[str] = (MERCHANT,)) -> str:
    """The intake's dedup and fan-out, for receiver/intake.py (KEYS: the first destination's head and
    waiting list, seen, then each further destination's head and waiting list). `keys` are
    `merchant`'s; each destination's are derived from them."""
    own = [keys.for_destination(name) for name in destinations]
    targets = []
    for k in own:
        fields = ", ".join(lua_string(x) for x in template_args(k.queue_name))
        values = [k.rq_queue, k.active_orders, k.rq_deferred]
        targets.append(
            "{" + ", ".join(lua_string(v) for v in values) + ", {" + fields + "}, "
            + lua_string(k.job_id("")) + ", " + lua_string(destination_field(k.destination)) + "}"
        )  # fmt: skip
    return chain_script(own[0], INTAKE.replace("{TARGETS}", "{" + ", ".join(targets) + "}"), history_ttl)

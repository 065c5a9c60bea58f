"""Dedup and enqueue as ONE atomic Redis step: remember the order's new events and write their RQ jobs.

A Lua script runs alone on the Redis server, so a marker is never written without its job (or a job
without its marker), and fifty concurrent deliveries of one token queue each event exactly once.
The answer is sent only after the script returned, so a 200 always means "in Redis".

The replay guard (`Intake.intake_order`) sits in front of it for heavy callbacks only: their events are
looked up first, so a replay of a long event list costs one read instead of all its job data again.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence
from typing import Any

from hiredis import pack_command
from redis.asyncio import Redis
from redis.exceptions import NoScriptError, RedisError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from receiver.chains import chain_args, chain_keys, intake_script
from receiver.connections import deadline
from receiver.destinations import MERCHANT, Destination
from receiver.errors import IntergiroReceiverError
from receiver.history import DUPLICATE, HistoryNote, indexable_number, remember_on
from receiver.logs import log
from receiver.order import build_updates, event_key
from receiver.rediskeys import RedisKeys
from receiver.redistext import text
from receiver.rqstore import update_json

# The script is receiver/chains.py's: the order's chain is joined there (the same fragment requeue
# uses). Per order, only the first undelivered update is pushed to the RQ queue (the "head"); the
# others wait in event order and the worker that finishes the head pushes the next, so one order's
# updates reach the merchant in sequence however many workers run. What is the same for every call
# (key names, the job fields every update shares) is written into the script's text once: packing
# twenty constant arguments per callback was most of redis-py's cost.


Batch = list[tuple[tuple[Any, ...], "asyncio.Future[Any]"]]
REPLICA_WAIT_MS = 1000
# The replay guard: a callback whose job data would be at least this large (estimated as its events
# times its body's bytes: every update carries the order, and the body carries every event) has its
# events looked up before its updates are built, so a replay of it costs one read, not the building,
# packing and sending of all that job data again. Below it, building the job data costs less than the
# extra round trip (the intake script refuses a duplicate anyway, in the same step that stores), so a
# usual callback (one or two events, a few KiB) goes straight to the script; bench/ingest and
# bench/hostile_input.py measure both sides.
REPLAY_GUARD_MIN_JOB_BYTES = 64 * 1024


def needs_replay_guard(events: int, size: int) -> bool:
    """Whether a callback of `events` events and a body of `size` bytes is worth the replay guard."""
    return events > 1 and events * size >= REPLAY_GUARD_MIN_JOB_BYTES


class NotReplicated(IntergiroReceiverError, RedisError):
    """The callback is on the primary but not yet on enough replicas: a failover could lose it, so the
    sender is told to retry (its retry is a duplicate that waits for the replicas again)."""


class Intake:
    """Stores new updates of one order atomically; shared by the HTTP receiver and reconcile.

    Calls made while the event loop is busy with other callbacks are sent together, as one pipeline
    of script calls (one round trip, one write), the replay guard's reads among them; each call stays
    its own atomic script run and its caller still waits for its own answer, so a 200 still means
    "in Redis".
    """

    def __init__(
        self,
        redis: Redis,
        keys: RedisKeys,
        dedup_ttl_seconds: int,
        min_replicas: int = 0,
        timeout_seconds: float = 5.0,
        history_ttl: int = 0,
        destinations: Sequence[Destination] = (Destination(MERCHANT),),
    ) -> None:
        """`destinations`: each update is queued, in the same step, for every one whose filters it
        passes (one delivery per destination, each in that destination's chain of the order)."""
        self.redis = redis
        self.destinations = tuple(destinations)
        self._chain_keys = [keys.for_destination(d.name) for d in destinations]
        self.timeout_seconds = timeout_seconds
        self.min_replicas = min_replicas
        self.keys = keys
        self.ttl = dedup_ttl_seconds
        self.history_ttl = history_ttl
        self._script = redis.register_script(
            intake_script(keys, history_ttl, [d.name for d in self.destinations])
        )
        self._pending: Batch = []

    async def store(
        self,
        updates: Sequence[dict[str, Any]],
        created_at: str | None = None,
        history: HistoryNote | None = None,
        job_meta: bytes = b"",
    ) -> list[str]:
        """Queue the updates (all of one order) whose event is new; returns the ids queued now.
        `created_at` (RQ's job timestamps; now when not given) may be the callback's `received_at`;
        `history` is the order history's entry of this step, written in it; `job_meta`, RQ's `meta`
        of the jobs written (JSON: the callback's trace context, receiver/tracing.py)."""
        if not updates:
            return []
        order_id = updates[0]["order_id"]
        first, *others = self._chain_keys
        keys = [*chain_keys(first, order_id), self.keys.seen(order_id)]
        for k in others:
            keys += chain_keys(k, order_id)
        args: list[Any] = [*chain_args(order_id, created_at), self.ttl]
        if history is None or not self.history_ttl:
            args += [b"", b"", b""]
        else:
            number = indexable_number(updates[0].get("order_number"))
            args += [
                history.start,
                b"1" if history.always else b"",
                self.keys.history_number(number) if number else b"",
            ]
        args.append(job_meta)
        for update in updates:
            args += [
                event_key(update["event"]["sequence"], update["event"]["type"]),
                update["id"],
                update_json(update),
                update["status"],
                "".join("1" if d.matches(update) else "0" for d in self.destinations),
            ]
        queued = await self._call(("EVALSHA", self._script.sha, len(keys), *keys, *args))
        return [text(q) for q in queued]

    def _call(self, command: tuple[Any, ...]) -> asyncio.Future[Any]:
        """Send `command` with the next batch; its answer (or its error) is the future's."""
        answer: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._pending.append((command, answer))
        if len(self._pending) == 1:
            asyncio.get_running_loop().create_task(self._send(), name="intake-batch")
        return answer

    async def intake_order(
        self,
        order: Mapping[str, Any],
        *,
        received_at: str,
        verified_by: str,
        repaired: Sequence[str] = (),
        history: HistoryNote | None = None,
        size: int = 0,
        job_meta: bytes = b"",
    ) -> list[str]:
        """Decide which events of a parsed, trusted order are new and queue their updates; returns the
        ids queued now (none: a duplicate). `size`: the bytes the order arrived in, which with its event
        count tells whether the replay guard is worth its round trip (`needs_replay_guard`); `job_meta`
        as for `store`."""
        events = order.get("event") or ()
        new: set[str] | None = None  # event keys not seen yet; None: not looked up
        if needs_replay_guard(len(events), size):
            new = await self.new_events(order["id"], [event_key(i, e["type"]) for i, e in enumerate(events)])
            if not new:
                if history is not None:
                    await self.remember(order["id"], history, DUPLICATE)
                return []
        updates = build_updates(order, received_at=received_at, verified_by=verified_by, repaired=repaired)
        if new is not None:
            updates = [u for u in updates if event_key(u["event"]["sequence"], u["event"]["type"]) in new]
        return await self.store(updates, received_at, history, job_meta)

    async def new_events(self, order_id: str, event_keys: Sequence[str]) -> set[str]:
        """The event keys of `order_id` not seen yet: read before any job data is built, so a replay
        costs one round trip (in the batch of the script calls waiting with it). Only a shortcut:
        `store` decides again, atomically. Renews the seen events' expiry as storing would (they are
        remembered DEDUP_TTL_SECONDS after the last callback)."""
        seen = self.keys.seen(order_id)
        flags, _ = await asyncio.gather(
            self._call(("HMGET", seen, *event_keys)), self._call(("EXPIRE", seen, self.ttl))
        )
        return {key for key, flag in zip(event_keys, flags, strict=True) if flag is None}

    async def remember(self, order_id: str, history: HistoryNote, outcome: str) -> None:
        """Write a history entry outside the intake script (a callback answered from `new_events`
        alone). Best effort: a history that cannot be written never fails the callback."""
        if not self.history_ttl:
            return
        key = self.keys.history(order_id)
        try:
            async with (
                deadline(self.redis, self.timeout_seconds),
                self.redis.pipeline(transaction=True) as pipe,
            ):
                remember_on(pipe, key, history.completed(outcome), self.history_ttl)
                await pipe.execute()
        except RedisError as exc:  # a timeout too: deadline raises redis's TimeoutError
            log.warning("history entry not written", order=order_id, error=type(exc).__name__)

    async def _run(self, calls: list[tuple[Any, ...]]) -> list[Any]:
        """One write of commands (script calls, and the replay guard's reads) on one connection, then
        their answers in order; with REDIS_MIN_REPLICAS, a WAIT after them on the same connection, so no
        caller hears "stored" before enough replicas have its writes.

        This is a pipeline without redis-py's pipeline object: hiredis packs the commands in C and the
        answers are read straight off the connection, which halves the CPU each callback costs here.
        The pool still makes the connection (AUTH, db, TLS, Sentinel's master). Give the Intake a
        client without a socket timeout (`timeout_seconds` bounds the batch instead): redis-py would
        otherwise start a task for the write and a timer for every answer.
        """
        commands = list(calls)
        if self.min_replicas:
            commands.append(("WAIT", self.min_replicas, REPLICA_WAIT_MS))
        pool = self.redis.connection_pool
        connection: Any = None
        try:
            # One deadline for the whole batch, taking the connection included: against a Redis that
            # hangs, making one (connect, HELLO, AUTH) waits as long as any answer.
            async with asyncio.timeout(self.timeout_seconds):
                connection = await pool.get_connection()  # type: ignore[no-untyped-call]
                await connection.send_packed_command(
                    b"".join(map(pack_command, commands)), check_health=False
                )
                answers: list[Any] = []
                for _ in commands:
                    try:
                        answers.append(await connection.read_response())
                    except ResponseError as exc:  # this call's own error; the others still answer
                        answers.append(exc)
        except BaseException as exc:
            # Answers may still be on their way: a connection left mid-batch must never be reused (redis-py
            # drops one interrupted inside its own calls; this covers the rest of the batch too).
            if connection is not None:
                await connection.disconnect(nowait=True)
            if isinstance(exc, TimeoutError):
                # A connection cut off while being made went back to the pool half set up: drop them all.
                await pool.disconnect()
                raise RedisTimeoutError(f"no answer from Redis within {self.timeout_seconds:g} s") from None
            raise
        finally:
            if connection is not None:
                await pool.release(connection)
        if self.min_replicas:
            acknowledged = answers.pop()
            if not isinstance(acknowledged, int) or acknowledged < self.min_replicas:
                raise NotReplicated(f"on {acknowledged} of {self.min_replicas} replicas in time")
        return answers

    async def _send(self) -> None:
        """Run the waiting commands in one pipeline and hand each caller its own answer."""
        batch, self._pending = self._pending, []
        try:
            answers = await self._run([call for call, _ in batch])
            missed = [i for i, a in enumerate(answers) if isinstance(a, NoScriptError)]
            if missed:  # a restarted or flushed Redis forgot the script: load it, rerun only those
                await self.redis.script_load(self._script.script)
                for i, again in zip(missed, await self._run([batch[i][0] for i in missed]), strict=True):
                    answers[i] = again
        except BaseException as exc:  # Redis gone (or this task cancelled): every caller hears of it
            for _, answer in batch:
                if not answer.done():
                    answer.set_exception(exc)
            if not isinstance(exc, Exception):
                raise
            return
        for (_, answer), result in zip(batch, answers, strict=True):
            if answer.done():  # its caller went away; the update is stored all the same
                continue
            if isinstance(result, Exception):
                answer.set_exception(result)
            else:
                answer.set_result(result)

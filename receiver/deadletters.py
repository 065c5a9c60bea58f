"""The dead-letter queue: updates that failed for good, kept for ops to inspect, requeue or purge.

One Redis hash (`igr:dlq`): update id -> JSON entry {id, order_id, update, attempts, last_error,
last_error_at, dead_lettered_at}, and `destination` when it is not `merchant` (its id is then the
delivery's job id, `<update id>__<destination>`). The update's RQ job stays, as failed, in RQ's FailedJobRegistry (for
RQ's failure TTL, 30 days), so RQ's tools count it; an update whose job was deleted from outside has
an entry here only. `requeue` puts the update back into its order's chain with the same
id (see receiver.chains.REQUEUE), so it is delivered again, after whatever is its order's head then.
"""

from __future__ import annotations

import argparse
from collections.abc import Collection
from typing import Any

import orjson
from redis import Redis
from redis.exceptions import WatchError

from receiver.chains import OrderChains
from receiver.clock import utc_now
from receiver.connections import sync_redis
from receiver.destinations import MERCHANT
from receiver.errors import report
from receiver.history import entry as history_entry
from receiver.history import short_id
from receiver.rediskeys import RedisKeys
from receiver.rqstore import update_json
from receiver.settings import Settings


class DestinationNotConfigured(Exception):
    """A dead letter for a destination no longer configured: requeued, no worker would deliver it."""

    def __init__(self, update_id: str, destination: str) -> None:
        super().__init__(
            f"{update_id} is for destination {destination!r}, no longer configured; not requeued"
        )
        self.destination = destination


# How many times purge reads an entry again when the dead-letter queue changed under it.
PURGE_ATTEMPTS = 5


class DeadLetters:
    def __init__(
        self,
        redis: Redis,
        keys: RedisKeys,
        history_ttl: int = 0,
        configured: Collection[str] | None = None,
    ) -> None:
        """`configured`: the destinations configured now; when given, `requeue` refuses the others."""
        self.redis = redis
        self.keys = keys
        self.history_ttl = history_ttl
        self.configured = None if configured is None else frozenset(configured)

    def entries(self, destination: str | None = None) -> list[dict[str, Any]]:
        """Every entry (of `destination`, when given), oldest dead-lettered first."""
        raw = self.redis.hgetall(self.keys.dead_letters)
        entries = [orjson.loads(v) for v in raw.values()]
        if destination is not None:
            entries = [e for e in entries if e.get("destination", MERCHANT) == destination]
        return sorted(entries, key=lambda e: (e.get("dead_lettered_at", ""), e["id"]))

    def _keys(self, entry: dict[str, Any]) -> RedisKeys:
        """The keys of the destination the entry's delivery was for."""
        name = entry.get("destination", MERCHANT)
        return self.keys if name == MERCHANT else self.keys.for_destination(name)

    def get(self, update_id: str) -> dict[str, Any] | None:
        raw = self.redis.hget(self.keys.dead_letters, update_id)
        return None if raw is None else dict(orjson.loads(raw))

    def ids(self, destination: str | None = None) -> list[str]:
        if destination is not None:
            return sorted(e["id"] for e in self.entries(destination))
        return sorted(
            k.decode() if isinstance(k, bytes) else k for k in self.redis.hkeys(self.keys.dead_letters)
        )

    def requeue(self, update_id: str) -> bool:
        """Back through delivery, same id, through its order's chain; False when not dead-lettered;
        DestinationNotConfigured (and nothing changed) when its destination is no longer configured."""
        entry = self.get(update_id)
        if entry is None:
            return False
        destination = entry.get("destination", MERCHANT)
        if self.configured is not None and destination not in self.configured:
            raise DestinationNotConfigured(update_id, destination)
        update = entry["update"]
        return OrderChains(self.redis, self._keys(entry), self.history_ttl).requeue(
            update, update_json(update)
        )

    def purge(self, update_id: str) -> bool:
        """Forget the dead letter, and its job in RQ's FailedJobRegistry, in one step (the order's
        history keeps that it was purged); False, and nothing changed, when it is not a dead letter
        (an update still queued or retrying keeps its job). The entry is read and removed under WATCH:
        one requeued meanwhile is not purged."""
        for _ in range(PURGE_ATTEMPTS):
            with self.redis.pipeline(transaction=True) as pipe:
                try:
                    pipe.watch(self.keys.dead_letters)  # type: ignore[no-untyped-call]
                    raw = pipe.hget(self.keys.dead_letters, update_id)
                    if raw is None:
                        return False
                    entry = orjson.loads(raw)
                    pipe.multi()
                    pipe.hdel(self.keys.dead_letters, update_id)
                    pipe.zrem(self._keys(entry).rq_failed, update_id)
                    pipe.delete(self.keys.rq_job(update_id))
                    if self.history_ttl:
                        history = self.keys.history(entry["order_id"])
                        short = short_id(entry["update"]["id"], entry["order_id"])
                        pipe.rpush(
                            history,
                            history_entry(
                                "purge", utc_now(), update=short, destination=entry.get("destination")
                            ),
                        )
                        pipe.expire(history, self.history_ttl)
                    return bool(pipe.execute()[0])
                except WatchError:
                    continue
        raise WatchError(f"the dead-letter queue kept changing while purging {update_id}")


def run_dlq_command(settings: Settings, args: argparse.Namespace) -> int:
    """`intergiro-receiver dlq list|show|requeue|purge`: 0 when done, 1 when an id is not there."""
    redis = sync_redis(settings, timeout=10)
    keys = RedisKeys(settings.redis_key_prefix, settings.queue_name)
    dlq = DeadLetters(redis, keys, settings.history_retention_seconds)
    configured = {d.name for d in settings.destinations}
    try:
        return _run(dlq, args, configured)
    finally:
        redis.close()


def _run(dlq: DeadLetters, args: argparse.Namespace, configured: set[str]) -> int:
    command = args.dlq_command
    destination = getattr(args, "destination", None)
    if command == "list":
        entries = dlq.entries(destination)
        if args.json:
            print(orjson.dumps(entries, option=orjson.OPT_INDENT_2).decode())
            return 0
        for e in entries:
            print(
                f"{e['id']}  destination={e.get('destination', MERCHANT)}  attempts={e['attempts']}  "
                f"at={e['dead_lettered_at']}  error={e['last_error']}"
            )
        print(f"{len(entries)} dead-lettered update(s)")
        return 0
    if command == "show":
        entry = dlq.get(args.id)
        if entry is None:
            report("dlq", f"{args.id} is not in the dead-letter queue")
            return 1
        print(orjson.dumps(entry, option=orjson.OPT_INDENT_2).decode())
        return 0
    act = dlq.requeue if command == "requeue" else dlq.purge
    done_word = "requeued" if command == "requeue" else "purged"
    ids = dlq.ids(destination) if args.all else [args.id]
    if command == "requeue":
        unserved = [
            i for i in ids if (found := dlq.get(i)) and found.get("destination", MERCHANT) not in configured
        ]
        for i in unserved:
            report("dlq", f"{i} is for a destination no longer configured; not requeued")
        ids = [i for i in ids if i not in unserved]
        if unserved and not ids:
            return 1
    missing = [i for i in ids if not act(i)]
    for i in ids:
        if i not in missing:
            print(f"{done_word} {i}")
    for i in missing:
        report("dlq", f"{i} is not in the dead-letter queue")
    if args.all:
        print(f"{len(ids) - len(missing)} update(s) {done_word}")
    return 1 if missing else 0

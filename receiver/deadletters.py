"""The dead-letter queue: updates that failed for good, kept for ops to inspect, requeue or purge.

One Redis hash (`igr:dlq`): update id -> JSON entry {id, order_id, update, attempts, last_error,
last_error_at, dead_lettered_at}, `http_status` when the last attempt got an answer, and `destination`
when it is not `merchant` (its id is then the
delivery's job id, `<update id>__<destination>`). The update's RQ job stays, as failed, in RQ's FailedJobRegistry (for
RQ's failure TTL, 30 days), so RQ's tools count it; an update whose job was deleted from outside has
an entry here only. `requeue` puts the update back into its order's chain with the same
id (see receiver.chains.REQUEUE), so it is delivered again, after whatever is its order's head then.
`DeadLetterFilter` says which entries an operator means; `apply` acts on all it matches, in batches.
"""

from __future__ import annotations

import argparse
import re
import time
from collections.abc import Collection, Iterator, Mapping
from dataclasses import asdict, dataclass
from datetime import datetime
from typing import Any

import orjson
from redis import Redis
from redis.exceptions import WatchError

from receiver.chains import OrderChains
from receiver.clock import utc_now
from receiver.connections import sync_redis
from receiver.destinations import MERCHANT
from receiver.errors import IntergiroReceiverError, report
from receiver.history import entry as history_entry
from receiver.history import short_id
from receiver.reconcile import parse_duration
from receiver.rediskeys import RedisKeys
from receiver.rqstore import update_json
from receiver.settings import Settings

# Entries read, and acted on, per round trip when an action applies to every entry a filter matches.
BATCH = 500
_STATUS = re.compile(r"[1-5](?:[0-9]{2}|xx)")
_STATUS_IN_ERROR = re.compile(r"\bHTTP ([1-5][0-9]{2})\b")


def http_status(entry: Mapping[str, Any]) -> int | None:
    """The HTTP status the merchant's last answer had (entries written before `http_status` was kept:
    read from the error), None when the last attempt got no answer."""
    status = entry.get("http_status")
    if isinstance(status, int):
        return status
    found = _STATUS_IN_ERROR.search(str(entry.get("last_error") or ""))
    return int(found[1]) if found else None


def dead_lettered_at(entry: Mapping[str, Any]) -> float | None:
    try:
        return datetime.fromisoformat(str(entry.get("dead_lettered_at")).replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


@dataclass(frozen=True)
class DeadLetterFilter:
    """Which dead letters an action or a page means: every field optional, the empty filter means all.
    `text`: in the id, order id, merchant order number or error (any case); `status`: the last answer's
    HTTP status, `400` or a class, `4xx`; `older_than` / `newer_than`: dead-lettered more / less than
    so many seconds ago."""

    destination: str | None = None
    text: str = ""
    status: str = ""
    older_than: int | None = None
    newer_than: int | None = None

    def __post_init__(self) -> None:
        if self.status and not _STATUS.fullmatch(self.status):
            raise ValueError("status: an HTTP status (400) or a class of them (4xx)")

    @classmethod
    def from_json(cls, body: Any) -> DeadLetterFilter:
        """The filter of `POST /api/dlq/requeue|purge`: `{"destination", "text", "status", "newer_than":
        "15m", "older_than": "1h"}`; ValueError names the key that cannot be used."""
        if not isinstance(body, dict):
            raise ValueError("the body must be a JSON object (`{}` means every dead letter)")
        unknown = sorted(set(body) - {"destination", "text", "status", "newer_than", "older_than"})
        if unknown:
            raise ValueError(
                f"{unknown[0]}: not a filter key (destination, text, status, newer_than, older_than)"
            )
        for name in ("destination", "text"):
            if not isinstance(body.get(name, ""), str):
                raise ValueError(f"{name}: must be a string")
        status = body.get("status", "")
        if isinstance(status, bool) or not isinstance(status, int | str):
            raise ValueError("status: an HTTP status (400) or a class of them (4xx)")
        ages: dict[str, int | None] = {}
        for name in ("older_than", "newer_than"):
            raw = body.get(name)
            if raw is None:
                ages[name] = None
                continue
            try:
                ages[name] = parse_duration(str(raw))
            except ValueError:
                raise ValueError(f"{name}: a number with s, m, h, d or w (e.g. 15m, 2h, 3d)") from None
        return cls(body.get("destination") or None, body.get("text", "").strip(), str(status).lower(), **ages)

    def described(self) -> dict[str, Any]:
        """The filter's set keys (what a log line says of it)."""
        return {k: v for k, v in asdict(self).items() if v not in (None, "")}

    def matches(self, entry: Mapping[str, Any], now: float) -> bool:
        if self.destination is not None and entry.get("destination", MERCHANT) != self.destination:
            return False
        if self.text:
            update = entry.get("update") or {}
            haystack = " ".join(
                str(x or "") for x in (entry.get("id"), entry.get("order_id"), update.get("order_number"),
                                       entry.get("last_error"))
            ).lower()  # fmt: skip
            if self.text.lower() not in haystack:
                return False
        if self.status:
            status = http_status(entry)
            if status is None or not (
                str(status) == self.status
                or (self.status.endswith("xx") and str(status)[0] == self.status[0])
            ):
                return False
        if self.older_than is None and self.newer_than is None:
            return True
        at = dead_lettered_at(entry)
        if at is None:
            return False
        age = now - at
        return (self.older_than is None or age >= self.older_than) and (
            self.newer_than is None or age <= self.newer_than
        )


class DestinationNotConfigured(IntergiroReceiverError):
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
        return self.keys.for_destination(name)

    def get(self, update_id: str) -> dict[str, Any] | None:
        raw = self.redis.hget(self.keys.dead_letters, update_id)
        return None if raw is None else dict(orjson.loads(raw))

    def ids(self, destination: str | None = None) -> list[str]:
        if destination is not None:
            return sorted(e["id"] for e in self.entries(destination))
        return sorted(
            k.decode() if isinstance(k, bytes) else k for k in self.redis.hkeys(self.keys.dead_letters)
        )

    def matching(self, chosen: DeadLetterFilter, now: float | None = None) -> Iterator[dict[str, Any]]:
        """The entries `chosen` matches, read BATCH at a time (in no particular order)."""
        now = time.time() if now is None else now
        for _, raw in self.redis.hscan_iter(self.keys.dead_letters, count=BATCH):
            entry = orjson.loads(raw)
            if chosen.matches(entry, now):
                yield entry

    def requeue(self, update_id: str) -> bool:
        """Back through delivery, same id, through its order's chain; False when not dead-lettered;
        DestinationNotConfigured (and nothing changed) when its destination is no longer configured."""
        entry = self.get(update_id)
        if entry is None:
            return False
        destination = entry.get("destination", MERCHANT)
        if self.configured is not None and destination not in self.configured:
            raise DestinationNotConfigured(update_id, destination)
        return self._requeue([entry]) == 1

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

    def apply(
        self, action: str, chosen: DeadLetterFilter, destinations: Collection[str] | None = None
    ) -> int:
        """Requeue or purge every entry `chosen` matches, BATCH per round trip; returns how many were.
        `destinations`: requeue only entries for these (a destination no longer configured has no
        worker to deliver them)."""
        act = self._requeue if action == "requeue" else self._purge
        done, batch, seen = 0, [], set()
        for entry in self.matching(chosen):
            if entry["id"] in seen:  # a scan may answer an entry twice (or one requeued and dead again)
                continue
            seen.add(entry["id"])
            if action == "requeue" and destinations is not None:
                if entry.get("destination", MERCHANT) not in destinations:
                    continue
            batch.append(entry)
            if len(batch) == BATCH:
                done, batch = done + act(batch), []
        return done + (act(batch) if batch else 0)

    def _requeue(self, entries: list[dict[str, Any]]) -> int:
        """Each entry's update back into its order's chain (one script run each, one round trip)."""
        chains: dict[str, OrderChains] = {}
        with self.redis.pipeline(transaction=False) as pipe:
            for entry in entries:
                name = entry.get("destination", MERCHANT)
                if name not in chains:
                    chains[name] = OrderChains(self.redis, self._keys(entry), self.history_ttl)
                update = entry["update"]
                chains[name].requeue_on(pipe, update, update_json(update))
            return sum(1 for answer in pipe.execute() if answer)

    def _purge(self, entries: list[dict[str, Any]]) -> int:
        """Forget each entry (each a dead letter, as `matching` read it) and its RQ job, all in one
        transaction (each order's history keeps that its update was purged)."""
        removals = []  # where each entry's HDEL answers, among the transaction's answers
        with self.redis.pipeline(transaction=True) as pipe:
            for entry in entries:
                update_id = entry["id"]
                removals.append(len(pipe))
                pipe.hdel(self.keys.dead_letters, update_id)
                pipe.zrem(self._keys(entry).rq_failed, update_id)
                pipe.delete(self.keys.rq_job(update_id))
                if "order_id" in entry and self.history_ttl:
                    history = self.keys.history(entry["order_id"])
                    short = short_id(entry["update"]["id"], entry["order_id"])
                    note = history_entry(
                        "purge", utc_now(), update=short, destination=entry.get("destination")
                    )
                    pipe.rpush(history, note)
                    pipe.expire(history, self.history_ttl)
            answers = pipe.execute()
        return sum(int(answers[n]) for n in removals)


def run_dlq_command(settings: Settings, args: argparse.Namespace) -> int:
    """`intergiro-receiver dlq list|show|requeue|purge`: 0 when done, 1 when an id is not there."""
    redis = sync_redis(settings, timeout=10)
    keys = RedisKeys.of(settings)
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

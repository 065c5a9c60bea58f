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
from collections.abc import Callable, Collection, Iterator, Mapping
from dataclasses import asdict, dataclass
from datetime import datetime
from typing import Any

import orjson
from redis import Redis
from redis.client import Pipeline
from redis.exceptions import WatchError

from receiver.chains import OrderChains
from receiver.clock import utc_now
from receiver.connections import sync_redis
from receiver.destinations import MERCHANT
from receiver.errors import IntergiroReceiverError, report
from receiver.history import purge_entry, remember_on
from receiver.reconcile import parse_duration
from receiver.rediskeys import RedisKeys
from receiver.rqstore import lua_string, update_json
from receiver.settings import Settings

# Entries read, and acted on, per round trip when an action applies to every entry a filter matches.
BATCH = 500

# The scripts' side of the entry (composed into receiver.chains' scripts; needs the locals `order_id`
# and `now_text`). Written by `dead_letter` exactly as `entry` writes it (without `http_status`: no
# attempt of its own).
LUA = """
local dead_letters, dead_letter_destination = {DEAD_LETTERS}, {DESTINATION}

-- update `id` (its JSON `update`) goes to the dead-letter queue after `attempts`, for `reason`
local function dead_letter(id, update, attempts, reason)
  local entry = '{"id":' .. cjson.encode(id) .. ',"order_id":' .. cjson.encode(order_id)
    .. ',"update":' .. update .. ',"attempts":' .. attempts .. ',"last_error":' .. cjson.encode(reason)
    .. ',"last_error_at":' .. cjson.encode(now_text) .. ',"dead_lettered_at":' .. cjson.encode(now_text)
    .. dead_letter_destination .. '}'
  redis.call('HSET', dead_letters, id, entry)
end

-- an entry made by the worker (`entry`)
local function store_dead_letter(id, entry)
  redis.call('HSET', dead_letters, id, entry)
end

local function is_dead_lettered(id)
  return redis.call('HEXISTS', dead_letters, id) == 1
end

-- takes update `id` out of the dead-letter queue: the attempts its entry counts, nil when it had none
local function take_dead_letter(id)
  local entry = redis.call('HGET', dead_letters, id)
  if not entry then return nil end
  redis.call('HDEL', dead_letters, id)
  return tonumber(cjson.decode(entry)['attempts']) or 0
end
"""


def lua(keys: RedisKeys) -> str:
    """LUA for one destination's scripts (`keys` are the destination's)."""
    return LUA.replace("{DEAD_LETTERS}", lua_string(keys.dead_letters)).replace(
        "{DESTINATION}", lua_string(_destination_field(keys.destination))
    )


def _destination_field(destination: str) -> str:
    return "" if destination == MERCHANT else ',"destination":' + orjson.dumps(destination).decode()


def entry(
    job_id: str,
    update: Mapping[str, Any],
    destination: str,
    attempts: int,
    error: str,
    error_at: str,
    http_status: int | None = None,
) -> bytes:
    """The entry of `update` (delivery `job_id` of `destination`), dead-lettered now after `attempts`;
    `error` (at `error_at`) the last one, `http_status` the last answer's."""
    fields: dict[str, Any] = {
        "id": job_id,
        "order_id": update["order_id"],
        "update": update,
        "attempts": attempts,
        "last_error": error,
        "last_error_at": error_at,
        "dead_lettered_at": utc_now(),
    }
    if destination != MERCHANT:
        fields["destination"] = destination
    if http_status is not None:
        fields["http_status"] = http_status
    return orjson.dumps(fields)


def read_dead_lettered(pipe: Pipeline, keys: RedisKeys, job_id: str) -> None:
    """Queue on `pipe` whether delivery `job_id` is in the dead-letter queue."""
    pipe.hexists(keys.dead_letters, job_id)


def destination_of(entry: Mapping[str, Any]) -> str:
    """The destination the entry's delivery was for."""
    return str(entry.get("destination", MERCHANT))


# How the console sorts the entries (receiver/ops/state.py).
SORTS: dict[str, Callable[[dict[str, Any]], Any]] = {
    "time": lambda e: (e.get("dead_lettered_at") or "", e["id"]),
    "order": lambda e: (e.get("order_id") or "", e["id"]),
    "destination": lambda e: (destination_of(e), e.get("dead_lettered_at") or "", e["id"]),
    "attempts": lambda e: (int(e.get("attempts") or 0), e.get("dead_lettered_at") or "", e["id"]),
}
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
        if self.destination is not None and destination_of(entry) != self.destination:
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
            entries = [e for e in entries if destination_of(e) == destination]
        return sorted(entries, key=lambda e: (e.get("dead_lettered_at", ""), e["id"]))

    def _keys(self, entry: dict[str, Any]) -> RedisKeys:
        """The keys of the destination the entry's delivery was for."""
        return self.keys.for_destination(destination_of(entry))

    def get(self, update_id: str) -> dict[str, Any] | None:
        raw = self.redis.hget(self.keys.dead_letters, update_id)
        return None if raw is None else dict(orjson.loads(raw))

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
        destination = destination_of(entry)
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
                        self._remember_purge(pipe, entry)
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
                if destination_of(entry) not in destinations:
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
                name = destination_of(entry)
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
                    self._remember_purge(pipe, entry)
            answers = pipe.execute()
        return sum(int(answers[n]) for n in removals)

    def _remember_purge(self, pipe: Pipeline, entry: dict[str, Any]) -> None:
        """Queue the order's history entry that tells of the purge on `pipe`."""
        note = purge_entry(entry["update"]["id"], entry["order_id"], utc_now(), entry.get("destination"))
        remember_on(pipe, self.keys.history(entry["order_id"]), note, self.history_ttl)


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
                f"{e['id']}  destination={destination_of(e)}  attempts={e['attempts']}  "
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
    done_word = "requeued" if command == "requeue" else "purged"
    if args.all:
        return _run_all(dlq, args, configured)
    act = dlq.requeue if command == "requeue" else dlq.purge
    found = dlq.get(args.id)
    if command == "requeue" and found and destination_of(found) not in configured:
        report("dlq", f"{args.id} is for a destination no longer configured; not requeued")
        return 1
    if not act(args.id):
        report("dlq", f"{args.id} is not in the dead-letter queue")
        return 1
    print(f"{done_word} {args.id}")
    return 0


# How many ids of dead letters for a destination no longer configured `requeue --all` names.
UNSERVED_NAMED = 10


def _run_all(dlq: DeadLetters, args: argparse.Namespace, configured: set[str]) -> int:
    """`requeue|purge --all [--destination ... --newer-than ...]`: every dead letter the options match,
    acted on BATCH per round trip (the console's "all matching" and `POST /api/dlq/requeue|purge`)."""
    command = args.dlq_command
    try:
        chosen = DeadLetterFilter.from_json(
            {
                "text": args.text, "status": args.status,
                **({"destination": args.destination} if args.destination else {}),
                **({"older_than": args.older_than} if args.older_than else {}),
                **({"newer_than": args.newer_than} if args.newer_than else {}),
            }
        )  # fmt: skip
    except ValueError as exc:
        report("dlq", str(exc).replace("_than:", "-than:"))
        return 2
    unserved: list[str] = []
    if command == "requeue":  # no worker would deliver them: left where they are, and said so
        unserved = sorted(e["id"] for e in dlq.matching(chosen) if destination_of(e) not in configured)
        for update_id in unserved[:UNSERVED_NAMED]:
            report("dlq", f"{update_id} is for a destination no longer configured; not requeued")
        if len(unserved) > UNSERVED_NAMED:
            report("dlq", f"{len(unserved) - UNSERVED_NAMED} more for a destination no longer configured")
    done = dlq.apply(command, chosen, configured if command == "requeue" else None)
    described = chosen.described()
    matching = " matching " + " ".join(f"{k}={v}" for k, v in described.items()) if described else ""
    print(f"{done} update(s) {'requeued' if command == 'requeue' else 'purged'}{matching}")
    return 1 if unserved and not done else 0

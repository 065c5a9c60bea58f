"""The order history's entry: its format, the Lua that writes it, its Python writers, and `trace`'s
reading of it (`story`, `render`; receiver/trace.py adds where the updates are now).

Each order has one Redis list (`<prefix>history:<order id>`) of small JSON entries in the order they
happened, kept HISTORY_RETENTION_SECONDS after its last entry; a merchant order number points at its
orders through a set (`<prefix>history:number:<number>`) kept as long. Entries:

- `callback`: a verified callback: `at`, `outcome` (`accepted`, `duplicate`), `verified_by`,
  `request_id`, `order_number`, `queued` (each queued update's `id` and `status`);
- `reconcile`: events `reconcile` found and queued: `at`, `queued` as above;
- `attempt`: one delivery attempt of `update`: `at` (its start), `target` (`webhook`, `handler`, both
  joined by `+`; a destination other than `merchant` names itself first: `erp:webhook`), `outcome`
  (`delivered`, `retry`, `dead_lettered`), `http_status`, `error`, `duration_ms`;
- `requeue`: ops requeued a dead-lettered `update`;
- `deleted_outside`: the RQ job of `update` was deleted from outside the product and it was
  dead-lettered; `destination_removed`: its destination left the configuration with it pending.
  Entries of a destination other than `merchant` carry its name in `destination` (attempts in `target`).

`trace` keeps each update's `state` as `merchant`'s chain tells it; the other destinations' are in its
`destinations` (name -> the outcome of its last attempt), and their attempts name them.

Entries are written by the same Lua scripts that change the state they describe (intake, finish,
retry, requeue), so the history never tells of something that did not happen. An update's event type
and sequence are read back from its id (`<order>-<sequence>-<type>`, `<order>-created`), and its state
now (LiveState, read by receiver/trace.py) from the chain itself (head, waiting list, retry schedule,
dead-letter queue) and the history.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass
from textwrap import indent
from typing import Any

import orjson
from redis import Redis

from receiver.destinations import MERCHANT
from receiver.errors import clip
from receiver.order import parse_update_id
from receiver.rediskeys import RedisKeys
from receiver.rqstore import lua_string

NUMBER_INDEX_CHARS = 128  # a longer merchant order number is not indexed (it would make a long key)
ERROR_CHARS = 200
HEADER_CHARS = 100  # of an answer's Retry-After or Content-Type
ANSWER_BODY_BYTES = 1024
# Control characters of an answer's body (a terminal's escape sequences among them) are not kept as such.
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")

# What an entry tells of (its `kind`)
CALLBACK = "callback"
RECONCILE = "reconcile"
ATTEMPT = "attempt"
REQUEUE = "requeue"
REPLAY = "replay"
PURGE = "purge"
DELETED_OUTSIDE = "deleted_outside"
DESTINATION_REMOVED = "destination_removed"
# A callback's `outcome`
ACCEPTED = "accepted"
DUPLICATE = "duplicate"
# An attempt's `outcome`, and the states `trace` tells of an update
DELIVERED = "delivered"
RETRY = "retry"
DEAD_LETTERED = "dead_lettered"
QUEUED = "queued"
WAITING = "waiting"
RETRYING = "retrying"
PURGED = "purged"
# Why an update was dead-lettered without an attempt of its own: its dead-letter entry's `last_error`,
# and what `trace` tells of the entry that says it.
DELETED_OUTSIDE_REASON = "job deleted outside intergiro-receiver"
DESTINATION_REMOVED_REASON = "destination removed"
REASONS = {DELETED_OUTSIDE: DELETED_OUTSIDE_REASON, DESTINATION_REMOVED: DESTINATION_REMOVED_REASON}

# The entries a script writes, in the step that changes what they tell of (composed into the scripts
# by receiver.chains and receiver.retries). Kept {TTL} seconds after the order's last entry (0: no
# history). Needs the local `order_id`.
LUA_WRITE = """
local history_prefix, history_ttl = {PREFIX}, {TTL}

local function remember(entry)
  if history_ttl > 0 then
    local key = history_prefix .. order_id
    redis.call('RPUSH', key, entry)
    redis.call('EXPIRE', key, history_ttl)
  end
end
"""

# The entries a chain script makes, and the merchant order number's index; after LUA_WRITE (needs the
# locals `order_id`, `now_text` and `suffix`, the destination's job id suffix). Updates are named by
# their id without the order id and its dash (`1-charge`): the list is the order's already; a
# destination's job id is named by its update's id and the destination (`history_destination`, set per
# destination by the intake).
LUA_ENTRIES = """
local history_destination = {DESTINATION}
local kind_requeue, kind_deleted_outside, kind_destination_removed = {KINDS}
local accepted, duplicate = {OUTCOMES}
local deleted_outside_reason = {DELETED_OUTSIDE_REASON}

local function plain(id)
  return cjson.encode(string.sub(id, #order_id + 2))
end

local function update_name(id)
  return cjson.encode(string.sub(id, #order_id + 2, #id - #suffix))
end

-- what happened to one update (requeued, dead-lettered without an attempt)
local function update_entry(kind, id)
  return '{"kind":"' .. kind .. '","at":' .. cjson.encode(now_text) .. ',"update":' .. update_name(id)
    .. history_destination .. '}'
end

-- an update the intake queued, as its callback's (or reconcile's) entry lists it
local function queued_item(id, status)
  return '{"id":' .. plain(id) .. ',"status":' .. cjson.encode(status) .. '}'
end

-- an update a replay queued, as its entry lists it
local function replayed_item(id)
  return '{"id":' .. update_name(id) .. '}'
end

-- the merchant order number's index (key `number_key`) names the order: its orders, comma-separated
-- (a string: the smallest key), kept as long as the history
local function index_number(number_key)
  local known = redis.call('GET', number_key)
  if not known then
    redis.call('SET', number_key, order_id, 'EX', history_ttl)
  else
    if #known < 4096 and not string.find(',' .. known .. ',', ',' .. order_id .. ',', 1, true) then
      redis.call('APPEND', number_key, ',' .. order_id)
    end
    redis.call('EXPIRE', number_key, history_ttl)
  end
end

-- completes an entry made beforehand without its closing brace (HistoryNote, replay_note)
local function queued_entry(start, items, outcome)
  local said = ''
  if outcome then said = ',"outcome":"' .. outcome .. '"' end
  return start .. said .. ',"queued":[' .. table.concat(items, ',') .. ']}'
end
"""


def lua_write(history_prefix: str, history_ttl: int) -> str:
    """LUA_WRITE with the deployment's history key prefix and TTL written in."""
    return LUA_WRITE.replace("{PREFIX}", lua_string(history_prefix)).replace("{TTL}", str(int(history_ttl)))


def lua_entries(destination: str) -> str:
    """LUA_ENTRIES for the scripts of one destination's chain."""
    names = {
        "DESTINATION": lua_string(destination_field(destination)),
        "KINDS": ", ".join(lua_string(k) for k in (REQUEUE, DELETED_OUTSIDE, DESTINATION_REMOVED)),
        "OUTCOMES": ", ".join(lua_string(k) for k in (ACCEPTED, DUPLICATE)),
        "DELETED_OUTSIDE_REASON": lua_string(DELETED_OUTSIDE_REASON),
    }
    text = LUA_ENTRIES
    for name, value in names.items():
        text = text.replace("{" + name + "}", value)
    return text


def destination_field(destination: str) -> str:
    """What an entry of a destination other than `merchant` adds (JSON, after a field)."""
    return "" if destination == MERCHANT else ',"destination":' + orjson.dumps(destination).decode()


@dataclass(frozen=True)
class HistoryNote:
    """The entry a step of the intake writes, made beforehand: a JSON object without its closing brace
    (the intake script adds `outcome` and `queued`), and whether it is written when nothing was queued
    (a callback's is; a reconcile run's only when it queued something)."""

    start: bytes
    always: bool

    def completed(self, outcome: str, queued: list[dict[str, Any]] | None = None) -> bytes:
        """The entry as stored, with its `outcome` and what was `queued` (as the intake script writes it)."""
        items = b",".join(orjson.dumps(item) for item in queued or [])
        return self.start + b',"outcome":"' + outcome.encode() + b'","queued":[' + items + b"]}"


def _number(order_number: Any) -> str | None:
    return clip(order_number, NUMBER_INDEX_CHARS) if isinstance(order_number, str) else None


def callback_note(at: str, verified_by: str, request: str, order_number: Any) -> HistoryNote:
    note = entry(
        CALLBACK, at, verified_by=verified_by, request_id=request, order_number=_number(order_number)
    )
    return HistoryNote(note[:-1], always=True)


def reconcile_note(at: str, order_number: Any = None) -> HistoryNote:
    """What reconcile's intake step writes (the merchant order number too: for an order that no
    callback ever reached, reconcile is the only step that tells it)."""
    return HistoryNote(entry(RECONCILE, at, order_number=_number(order_number))[:-1], always=False)


def replay_note(at: str, destination: str) -> bytes:
    """A replay's entry (receiver/replay.py), without its closing brace: the script adds what it queued."""
    return entry(REPLAY, at, destination=destination)[:-1]


def short_id(update_id: str, order_id: str) -> str:
    """An update's id as its order's history names it: without the order id and its dash."""
    return update_id[len(order_id) + 1 :] if update_id.startswith(order_id + "-") else update_id


def attempt_entry(
    update_id: str,
    order_id: str,
    at: str,
    target: str,
    outcome: str,
    http_status: int | None,
    error: str | None,
    duration_ms: float,
    retry_after: str | None = None,
    content_type: str | None = None,
    body: bytes = b"",
    replay: bool = False,
) -> bytes:
    """One delivery attempt: `outcome` is `delivered`, `retry` or `dead_lettered`; of the merchant's
    answer its `Retry-After` and `Content-Type` as sent (cut short) and the start of its `body` (at most
    ANSWER_BODY_BYTES, as text: invalid UTF-8 and control characters replaced); `replay`: of an update
    queued again by `replay`."""
    said = {
        "retry_after": clip(retry_after, HEADER_CHARS) if retry_after else None,
        "content_type": clip(content_type, HEADER_CHARS) if content_type else None,
        "body": _CONTROL.sub("\ufffd", body[:ANSWER_BODY_BYTES].decode("utf-8", "replace")) if body else None,
        "replay": True if replay else None,
    }
    return entry(
        ATTEMPT, at, update=short_id(update_id, order_id), target=target or None, outcome=outcome, http_status=http_status,
        error=clip(error, ERROR_CHARS) if error else None, duration_ms=round(duration_ms, 1),
        **{k: v for k, v in said.items() if v is not None},
    )  # fmt: skip


def purge_entry(update_id: str, order_id: str, at: str, destination: str | None) -> bytes:
    """Ops purged the dead-lettered `update_id` (receiver/deadletters.py)."""
    return entry(PURGE, at, update=short_id(update_id, order_id), destination=destination)


def indexable_number(number: Any) -> str | None:
    """The merchant order number as the index spells it, or None when it is not indexed."""
    if isinstance(number, str) and 0 < len(number) <= NUMBER_INDEX_CHARS:
        return number
    return None


def entry(kind: str, at: str, **fields: Any) -> bytes:
    """One history entry as stored: compact JSON, `kind` and `at` first, fields that are None left out
    (the reader takes a missing field as null; every byte is kept for a month per event)."""
    return orjson.dumps({"kind": kind, "at": at, **{k: v for k, v in fields.items() if v is not None}})


# --- reading: `trace` -------------------------------------------------------------------------------


@dataclass(frozen=True)
class LiveState:
    """Where an order's unfinished updates are now: its head, its waiting list, the updates waiting for
    a retry and those dead-lettered (of this order)."""

    head: str | None
    waiting: frozenset[str]
    retrying: frozenset[str]
    dead_lettered: frozenset[str]


def find_orders(redis: Redis, keys: RedisKeys, key: str) -> list[str]:
    """The order ids KEY names, newest first: an order id, an update id or a merchant order number."""
    if redis.exists(keys.history(key)):
        return [key]
    parsed = parse_update_id(key)
    if parsed is not None and redis.exists(keys.history(parsed[0])):
        return [parsed[0]]
    number = indexable_number(key)
    if number is None:
        return []
    raw = redis.get(keys.history_number(number))
    ids = raw.decode().split(",") if isinstance(raw, bytes) else []
    found = []
    for order_id in ids:
        first = redis.lindex(keys.history(order_id), 0)
        if first is not None:
            found.append((orjson.loads(first)["at"], order_id))  # type: ignore[arg-type]
    return [order_id for _, order_id in sorted(found, reverse=True)]


def story(entries: list[dict[str, Any]], order_id: str, live: LiveState) -> dict[str, Any]:
    """The document `trace --json` prints for one order, from its history entries and live state."""
    told = _Story(order_id)
    for e in entries:
        told.read(_full_ids(e, order_id))
    for update_id, update in told.updates.items():
        update["state"] = _state(update_id, told.finished.get(update_id), live)
    ordered = sorted(told.updates.values(), key=lambda u: (u["event"] or {}).get("sequence") or -1)
    document = {
        "order_id": order_id,
        "order_number": told.order_number,
        "callbacks": told.callbacks,
        "updates": ordered,
    }
    if told.replays:
        document["replays"] = told.replays
    return document


def _full_ids(e: dict[str, Any], order_id: str) -> dict[str, Any]:
    """The entry with its updates named by their whole id (`<order id>-1-charge`)."""
    if "update" in e:
        e = {**e, "update": f"{order_id}-{e['update']}"}
    if "queued" in e:
        e = {**e, "queued": [{**q, "id": f"{order_id}-{q['id']}"} for q in e["queued"]]}
    return e


class _Story:
    """An order's story as its entries tell it, read one entry at a time in the order they happened."""

    def __init__(self, order_id: str) -> None:
        self.order_id = order_id
        self.callbacks: list[dict[str, Any]] = []
        self.replays: list[dict[str, Any]] = []
        self.updates: dict[str, dict[str, Any]] = {}
        self.order_number: Any = None
        self.finished: dict[str, str] = {}  # update id -> delivered / dead_lettered, as the history says

    def read(self, e: dict[str, Any]) -> None:
        kind, at = e.get("kind"), str(e.get("at"))
        if kind == CALLBACK:
            self.order_number = e.get("order_number", self.order_number)
            self.callbacks.append(
                {
                    "received_at": at,
                    "outcome": e.get("outcome"),
                    "verified_by": e.get("verified_by"),
                    "request_id": e.get("request_id"),
                    "queued": [q["id"] for q in e.get("queued", [])],
                }
            )
            for item in e.get("queued", []):
                self.queue(item, at, CALLBACK)
        elif kind == RECONCILE:
            self.order_number = self.order_number or e.get("order_number")
            for item in e.get("queued", []):
                self.queue(item, at, RECONCILE)
        elif kind == REQUEUE:
            self.queue({"id": e["update"]}, at, REQUEUE)
        elif kind == REPLAY:
            self.replays.append(
                {
                    "at": at,
                    "destination": e.get("destination"),
                    "queued": [q["id"] for q in e.get("queued", [])],
                }
            )
        elif kind == PURGE and e["update"] in self.updates:
            self.updates[e["update"]]["purged_at"] = at
            self.finished[e["update"]] = PURGED
        elif kind == ATTEMPT or kind in REASONS:
            self.attempted(e, kind, at)

    def queue(self, item: dict[str, Any], at: str, by: str) -> None:
        """An update queued (by a callback, reconcile or requeue)."""
        update_id = item["id"]
        parsed = parse_update_id(update_id)
        sequence, event_type = (parsed[1], parsed[2]) if parsed else (None, None)
        known = self.updates.setdefault(
            update_id,
            {
                "id": update_id,
                "event": {"type": event_type, "sequence": sequence},
                "status": item.get("status"),
                "state": QUEUED,
                "queued_at": at,
                "queued_by": by,
                "attempts": [],
            },
        )
        if by == REQUEUE:
            known["queued_at"], known["queued_by"] = at, by
        self.finished.pop(update_id, None)

    def attempted(self, e: dict[str, Any], kind: str, at: str) -> None:
        """An attempt, or an update dead-lettered without one (`kind` says why)."""
        update = self.updates.setdefault(
            e["update"],
            {"id": e["update"], "event": None, "status": None, "state": None, "queued_at": None,
             "queued_by": None, "attempts": []},
        )  # fmt: skip
        destination = e.get("destination") or _destination_of(e.get("target"))
        if kind == ATTEMPT:
            update["attempts"].append(_attempt(e, at))
            outcome = str(e.get("outcome"))
        else:
            update["attempts"].append(
                {"at": at, "target": f"{destination}:" if destination else None, "outcome": DEAD_LETTERED,
                 "http_status": None, "error": REASONS[kind], "duration_ms": None}
            )  # fmt: skip
            outcome = DEAD_LETTERED
        if destination:  # another destination's: its own state, never merchant's
            update.setdefault("destinations", {})[destination] = outcome
        elif outcome in (DELIVERED, DEAD_LETTERED):
            self.finished[e["update"]] = outcome


def _attempt(e: dict[str, Any], at: str) -> dict[str, Any]:
    """An attempt entry as `trace` tells it."""
    return {
        "at": at,
        "target": e.get("target"),
        "outcome": e.get("outcome"),
        "http_status": e.get("http_status"),
        "error": e.get("error"),
        "duration_ms": e.get("duration_ms"),
        "retry_after": e.get("retry_after"),
        "content_type": e.get("content_type"),
        "body": e.get("body"),
        **({"replay": True} if e.get("replay") else {}),
    }


def _destination_of(target: Any) -> str | None:
    """The destination an attempt's target names (`erp:webhook`), None for `merchant`'s."""
    if isinstance(target, str) and ":" in target:
        return target.split(":", 1)[0]
    return None


def _state(update_id: str, finished: str | None, live: LiveState) -> str:
    if update_id in live.dead_lettered:
        return DEAD_LETTERED
    if update_id in live.retrying:
        return RETRYING
    if update_id == live.head:
        return QUEUED
    if update_id in live.waiting:
        return WAITING
    return finished or DELIVERED


def named_updates(entries: list[dict[str, Any]], order_id: str) -> list[str]:
    """The ids of the updates the entries name, sorted."""
    shorts = {q["id"] for e in entries for q in e.get("queued", [])}
    shorts |= {e["update"] for e in entries if "update" in e}
    return sorted(f"{order_id}-{short}" for short in shorts)


def remember_on(pipe: Any, key: str, entry: bytes, history_ttl: int) -> None:
    """Queue `entry` on the order's history `key` and keep it `history_ttl` seconds after this, on
    `pipe` (a redis-py pipeline, sync or asyncio): the Python twin of LUA_WRITE's `remember`."""
    pipe.rpush(key, entry)
    pipe.expire(key, history_ttl)


def read_entries(redis: Redis, keys: RedisKeys, order_id: str) -> list[dict[str, Any]]:
    return [orjson.loads(raw) for raw in redis.lrange(keys.history(order_id), 0, -1)]  # type: ignore[union-attr]


def render(document: dict[str, Any]) -> list[str]:
    """`trace`'s lines for a person: the order, then every step in time order."""
    steps: list[tuple[str, str]] = []
    for callback in document["callbacks"]:
        queued = ", ".join(callback["queued"]) or "nothing new"
        steps.append(
            (
                callback["received_at"],
                f"callback {callback['outcome']} (verified by {callback['verified_by']}, request "
                f"{callback['request_id']}): queued {queued}",
            )
        )
    for update in document["updates"]:
        if update["queued_by"] in (RECONCILE, REQUEUE):
            steps.append((update["queued_at"], f"{update['id']} queued by {update['queued_by']}"))
        for attempt in update["attempts"]:
            answer = (
                f"HTTP {attempt['http_status']}" if attempt["http_status"] is not None else attempt["error"]
            )
            took = f" in {attempt['duration_ms']:g} ms" if attempt["duration_ms"] is not None else ""
            target = f" to {attempt['target']}" if attempt["target"] else ""
            target += " (replay)" if attempt.get("replay") else ""
            said = f", Retry-After {attempt['retry_after']}" if attempt.get("retry_after") else ""
            text = f"{update['id']} attempt{target}: {attempt['outcome']} ({answer}{said}){took}"
            if attempt.get("body"):  # what the merchant said, under the attempt
                text += f"\n{' ' * 28}answer ({attempt.get('content_type') or 'no Content-Type'}):\n"
                text += indent(attempt["body"].rstrip(), " " * 30 + "| ")
            steps.append((attempt["at"], text))
    lines = [f"order {document['order_id']} (merchant number {document['order_number'] or '-'})"]
    lines += [f"  {at}  {text}" for at, text in sorted(steps, key=lambda step: step[0] or "")]
    lines.append("  now:")
    for update in document["updates"]:
        event = update["event"] or {}
        tried = Counter(_destination_of(a["target"]) for a in update["attempts"])  # None: merchant's
        others = "".join(
            f"; {name}: {state} after {tried[name]} attempt(s)"
            for name, state in sorted(update.get("destinations", {}).items())
        )
        own = f" after {tried[None]} attempt(s)" if tried[None] or not others else ""
        lines.append(
            f"    {update['id']}  {event.get('type')} -> {update['status']}: {update['state']}{own}{others}"
        )
    return lines

"""The order history: what happened to each order, written as it happens, and `trace`'s reader.

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
now from the chain itself (head, waiting list, retry schedule, dead-letter queue) and the history.
"""

from __future__ import annotations

import re
import uuid
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from textwrap import indent
from typing import Any

import orjson
from redis import Redis

from receiver.connections import sync_redis
from receiver.errors import clip
from receiver.order import CREATED_EVENT, EVENT_TYPES
from receiver.rediskeys import RedisKeys
from receiver.settings import Settings

NUMBER_INDEX_CHARS = 128  # a longer merchant order number is not indexed (it would make a long key)
ERROR_CHARS = 200
HEADER_CHARS = 100  # of an answer's Retry-After or Content-Type
ANSWER_BODY_BYTES = 1024
# Control characters of an answer's body (a terminal's escape sequences among them) are not kept as such.
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")
_REQUEST_ID = re.compile(r"[A-Za-z0-9._:/+=-]{1,64}")
_TRACEPARENT = re.compile(r"[0-9a-f]{2}-([0-9a-f]{32})-[0-9a-f]{16}-[0-9a-f]{2}")
_UPDATE_ID = re.compile(
    r"(?P<order>[A-Za-z0-9_-]+?)-(?:(?P<sequence>\d+)-(?P<type>[a-z]+)|(?P<created>created))"
)


@dataclass(frozen=True)
class HistoryNote:
    """The entry a step of the intake writes, made beforehand: a JSON object without its closing brace
    (the intake script adds `outcome` and `queued`), and whether it is written when nothing was queued
    (a callback's is; a reconcile run's only when it queued something)."""

    start: bytes
    always: bool


def _number(order_number: Any) -> str | None:
    return clip(order_number, NUMBER_INDEX_CHARS) if isinstance(order_number, str) else None


def callback_note(at: str, verified_by: str, request: str, order_number: Any) -> HistoryNote:
    note = entry(
        "callback", at, verified_by=verified_by, request_id=request, order_number=_number(order_number)
    )
    return HistoryNote(note[:-1], always=True)


def reconcile_note(at: str, order_number: Any = None) -> HistoryNote:
    """What reconcile's intake step writes (the merchant order number too: for an order that no
    callback ever reached, reconcile is the only step that tells it)."""
    return HistoryNote(entry("reconcile", at, order_number=_number(order_number))[:-1], always=False)


def replay_note(at: str, destination: str) -> bytes:
    """A replay's entry (receiver/replay.py), without its closing brace: the script adds what it queued."""
    return entry("replay", at, destination=destination)[:-1]


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
        "attempt", at, update=short_id(update_id, order_id), target=target or None, outcome=outcome, http_status=http_status,
        error=clip(error, ERROR_CHARS) if error else None, duration_ms=round(duration_ms, 1),
        **{k: v for k, v in said.items() if v is not None},
    )  # fmt: skip


def request_id(headers: Mapping[str, str]) -> str:
    """The callback's request id: `X-Request-ID` when it is a plausible one, else the trace id of a
    W3C `traceparent`, else one made here."""
    given = headers.get("X-Request-ID", "")
    if _REQUEST_ID.fullmatch(given):
        return given
    parent = _TRACEPARENT.fullmatch(headers.get("traceparent", "").strip().lower())
    if parent and parent.group(1) != "0" * 32:
        return parent.group(1)
    return uuid.uuid4().hex[:16]  # 64 random bits: unique enough to find one callback's lines


def indexable_number(number: Any) -> str | None:
    """The merchant order number as the index spells it, or None when it is not indexed."""
    if isinstance(number, str) and 0 < len(number) <= NUMBER_INDEX_CHARS:
        return number
    return None


def parse_update_id(update_id: str) -> tuple[str, int, str] | None:
    """(order id, sequence, event type) of an update id, or None when it is not one."""
    match = _UPDATE_ID.fullmatch(update_id)
    if match is None:
        return None
    if match.group("created"):
        return match.group("order"), -1, CREATED_EVENT
    if match.group("type") not in EVENT_TYPES:
        return None
    return match.group("order"), int(match.group("sequence")), match.group("type")


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
    callbacks: list[dict[str, Any]] = []
    replays: list[dict[str, Any]] = []
    updates: dict[str, dict[str, Any]] = {}
    order_number = None
    finished: dict[str, str] = {}  # update id -> delivered / dead_lettered, as the history says

    def queue(item: dict[str, Any], at: str, by: str) -> None:
        update_id = item["id"]
        parsed = parse_update_id(update_id)
        sequence, event_type = (parsed[1], parsed[2]) if parsed else (None, None)
        known = updates.setdefault(
            update_id,
            {
                "id": update_id,
                "event": {"type": event_type, "sequence": sequence},
                "status": item.get("status"),
                "state": "queued",
                "queued_at": at,
                "queued_by": by,
                "attempts": [],
            },
        )
        if by == "requeue":
            known["queued_at"], known["queued_by"] = at, by
        finished.pop(update_id, None)

    def full(short: str) -> str:
        return f"{order_id}-{short}"

    for e in entries:
        kind, at = e.get("kind"), str(e.get("at"))
        if "update" in e:
            e = {**e, "update": full(e["update"])}
        if "queued" in e:
            e = {**e, "queued": [{**q, "id": full(q["id"])} for q in e["queued"]]}
        if kind == "callback":
            order_number = e.get("order_number", order_number)
            callbacks.append(
                {
                    "received_at": at,
                    "outcome": e.get("outcome"),
                    "verified_by": e.get("verified_by"),
                    "request_id": e.get("request_id"),
                    "queued": [q["id"] for q in e.get("queued", [])],
                }
            )
            for item in e.get("queued", []):
                queue(item, at, "callback")
        elif kind == "reconcile":
            order_number = order_number or e.get("order_number")
            for item in e.get("queued", []):
                queue(item, at, "reconcile")
        elif kind == "requeue":
            queue({"id": e["update"]}, at, "requeue")
        elif kind == "replay":
            replays.append(
                {
                    "at": at,
                    "destination": e.get("destination"),
                    "queued": [q["id"] for q in e.get("queued", [])],
                }
            )
        elif kind == "purge" and e["update"] in updates:
            updates[e["update"]]["purged_at"] = at
            finished[e["update"]] = "purged"
        elif kind in ("attempt", "deleted_outside", "destination_removed"):
            update = updates.setdefault(
                e["update"],
                {"id": e["update"], "event": None, "status": None, "state": None, "queued_at": None,
                 "queued_by": None, "attempts": []},
            )  # fmt: skip
            destination = e.get("destination") or _destination_of(e.get("target"))
            if kind == "attempt":
                update["attempts"].append(
                    {
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
                )
                outcome = str(e.get("outcome"))
            else:
                error = (
                    "job deleted outside intergiro-receiver"
                    if kind == "deleted_outside"
                    else "destination removed"
                )
                update["attempts"].append(
                    {"at": at, "target": f"{destination}:" if destination else None, "outcome": "dead_lettered",
                     "http_status": None, "error": error, "duration_ms": None}
                )  # fmt: skip
                outcome = "dead_lettered"
            if destination:  # another destination's: its own state, never merchant's
                update.setdefault("destinations", {})[destination] = outcome
            elif outcome in ("delivered", "dead_lettered"):
                finished[e["update"]] = outcome
    for update_id, update in updates.items():
        update["state"] = _state(update_id, finished.get(update_id), live)
    ordered = sorted(updates.values(), key=lambda u: (u["event"] or {}).get("sequence") or -1)
    story = {"order_id": order_id, "order_number": order_number, "callbacks": callbacks, "updates": ordered}
    if replays:
        story["replays"] = replays
    return story


def _destination_of(target: Any) -> str | None:
    """The destination an attempt's target names (`erp:webhook`), None for `merchant`'s."""
    if isinstance(target, str) and ":" in target:
        return target.split(":", 1)[0]
    return None


def _state(update_id: str, finished: str | None, live: LiveState) -> str:
    if update_id in live.dead_lettered:
        return "dead_lettered"
    if update_id in live.retrying:
        return "retrying"
    if update_id == live.head:
        return "queued"
    if update_id in live.waiting:
        return "waiting"
    return finished or "delivered"


def read_entries(redis: Redis, keys: RedisKeys, order_id: str) -> list[dict[str, Any]]:
    return [orjson.loads(raw) for raw in redis.lrange(keys.history(order_id), 0, -1)]  # type: ignore[union-attr]


def live_state(redis: Redis, keys: RedisKeys, order_id: str, update_ids: list[str]) -> LiveState:
    """Where the order's updates are now (one round trip)."""
    with redis.pipeline(transaction=False) as pipe:
        pipe.get(keys.order_head(order_id))
        pipe.lrange(keys.order_waiting(order_id), 0, -1)
        for update_id in update_ids:
            pipe.zscore(keys.retry_schedule, update_id)
        for update_id in update_ids:
            pipe.hexists(keys.dead_letters, update_id)
        answers = pipe.execute()
    head, waiting = answers[0], answers[1]
    n = len(update_ids)
    return LiveState(
        head=head.decode() if head else None,
        waiting=frozenset(w.decode() for w in waiting),
        retrying=frozenset(
            u for u, due in zip(update_ids, answers[2 : 2 + n], strict=True) if due is not None
        ),
        dead_lettered=frozenset(u for u, dead in zip(update_ids, answers[2 + n :], strict=True) if dead),
    )


def trace(redis: Redis, keys: RedisKeys, key: str) -> list[dict[str, Any]]:
    """The story of every order KEY names (an order id, an update id or a merchant order number),
    newest first; empty when nothing is known."""
    documents = []
    for order_id in find_orders(redis, keys, key):
        entries = read_entries(redis, keys, order_id)
        shorts = {q["id"] for e in entries for q in e.get("queued", [])}
        shorts |= {e["update"] for e in entries if "update" in e}
        ids = sorted(f"{order_id}-{short}" for short in shorts)
        documents.append(story(entries, order_id, live_state(redis, keys, order_id, ids)))
    return documents


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
        if update["queued_by"] in ("reconcile", "requeue"):
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


def run_trace(settings: Settings, key: str, *, as_json: bool = False) -> int:
    """`intergiro-receiver trace KEY [--json]`: 0 when something is known, 1 when nothing is."""
    redis = sync_redis(settings, timeout=10)
    try:
        documents = trace(redis, RedisKeys.of(settings), key)
    finally:
        redis.close()
    if not documents:
        print(
            f"trace: nothing is known of {clip(key, 80)!r} (history is kept {settings.history_retention_seconds} s)"
        )
        return 1
    if as_json:
        print(
            orjson.dumps(
                documents[0] if len(documents) == 1 else documents, option=orjson.OPT_INDENT_2
            ).decode()
        )
        return 0
    for n, document in enumerate(documents):
        if n:
            print()
        print("\n".join(render(document)))
    return 0

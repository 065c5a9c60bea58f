"""One owner per record: a Redis record's field names are spelled in the module that owns it, and
nowhere else in the product's source (receiver/, workers/); what its Lua writes is what its Python
writes."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import orjson
import pytest
import redis

from receiver import deadletters, history
from receiver.chains import OrderChains
from receiver.rediskeys import RedisKeys
from receiver.rqstore import update_json

ROOT = Path(__file__).resolve().parent.parent
SOURCES = sorted(p for top in ("receiver", "workers") for p in (ROOT / top).rglob("*.py"))

# Each record's field names that say what they are (`id`, `order_id`, `update`, `at`, `status`,
# `destination` are every record's words and cannot be told apart by a search), and where the same
# word names a field of another record or a log line (the file, and what it is there).
RECORDS: dict[str, tuple[str, ...]] = {
    "receiver/deadletters.py": ("dead_lettered_at", "last_error_at", "last_error", "attempts", "http_status"),
    "receiver/deliveries.py": ("attempts", "earlier_attempts", "last_error", "last_error_at", "replay", "done:"),
    "receiver/history.py": (
        "kind", "verified_by", "request_id", "order_number", "duration_ms", "retry_after", "content_type",
        "queued", "queued_by", "queued_at", "purged_at", "outcome", "target", "replay",
    ),
}  # fmt: skip
SAME_WORD_ELSEWHERE: dict[str, dict[str, str]] = {
    "last_error": {
        "receiver/deadletters.py": "the dead-letter entry's",
        "receiver/deliveries.py": "the delivery record's",
        "receiver/ops/state.py": "the retrying page's and API's",
        "receiver/destination_state.py": "the destination state's",
    },
    "last_error_at": {
        "receiver/deadletters.py": "the dead-letter entry's",
        "receiver/deliveries.py": "the delivery record's",
        "receiver/ops/state.py": "the retrying page's and API's",
    },
    "attempts": {
        "receiver/deadletters.py": "the dead-letter entry's",
        "receiver/deliveries.py": "the delivery record's",
        "receiver/ops/state.py": "the retrying page's and API's (and its sort)",
        "receiver/ops/app.py": "`trace`'s document (receiver/history.py `story`)",
        "receiver/history.py": "`trace`'s document",
    },
    "http_status": {
        "workers/delivery.py": "the attempt's log line",
        "receiver/history.py": "the attempt's entry",
        "receiver/tracing.py": "the attempt's log line, as span attributes",
    },
    "duration_ms": {
        "workers/delivery.py": "the attempt's log line",
        "receiver/tracing.py": "the attempt's log line, as span attributes",
    },
    "verified_by": {"receiver/order.py": "the update message's"},
    "request_id": {"receiver/app.py": "the aiohttp request's key"},
    "order_number": {
        "receiver/order.py": "the update message's",
        "receiver/intake.py": "the update message's",
        "receiver/deadletters.py": "the update message's (the filter's text)",
    },
    "queued": {
        "receiver/chains.py": "an RQ job's status",
        "receiver/retries.py": "an RQ job's status",
        "receiver/app.py": "the callback's answer",
        "receiver/replay.py": "the replay's summary",
        "receiver/reconcile.py": "the reconcile run's summary",
        "receiver/destination_state.py": "`destination list`'s column",
        "workers/maintenance.py": "an RQ job's status",
    },
    "outcome": {
        "receiver/metrics/shared.py": "a metric's label",
        "receiver/metrics/receiver_registry.py": "a metric's label",
        "receiver/reconcile.py": "a metric's label",
    },
    "target": {
        "workers/delivery.py": "the attempt's log line",
        "receiver/ops/app.py": "`trace`'s document (receiver/history.py `story`)",
        "receiver/tracing.py": "the attempt's log line, as span attributes",
    },
    "replay": {
        "receiver/history.py": "the history entry's",
        "receiver/deliveries.py": "the delivery record's",
        "workers/delivery.py": "the attempt's log line",
        "receiver/replay.py": "the command's name",
        "receiver/cli.py": "the command's name",
        "receiver/ops/replaying.py": "the console's action and thread names",
        "receiver/tracing.py": "the attempt's log line, as span attributes",
    },
}


def spelled(name: str, text: str) -> bool:
    return re.search(rf"[\"']{re.escape(name)}[\"']", text) is not None


@pytest.mark.parametrize("owner", sorted(RECORDS))
def test_a_record_s_field_names_are_spelled_only_in_its_module(owner: str) -> None:
    strays = []
    for path in SOURCES:
        relative = path.relative_to(ROOT).as_posix()
        if relative == owner:
            continue
        text = path.read_text()
        for name in RECORDS[owner]:
            if spelled(name, text) and relative not in SAME_WORD_ELSEWHERE.get(name, {}):
                strays.append(f"{relative}: {name!r}")
    assert not strays, f"fields of {owner}'s record spelled outside it: {strays}"


def test_the_search_finds_a_field_spelled_outside_its_module() -> None:
    """The test above can fail: a dead-letter field spelled in the worker is found."""
    assert spelled("dead_lettered_at", 'entry["dead_lettered_at"] = utc_now()')
    assert spelled("kind", "{'kind': 'attempt'}") and not spelled("kind", "kind = 1")
    for name, files in SAME_WORD_ELSEWHERE.items():  # every exception is still needed
        for relative in files:
            assert spelled(name, (ROOT / relative).read_text()), f"{relative} no longer spells {name!r}"


def update_of(order_id: str, sequence: int) -> dict[str, Any]:
    return {
        "id": f"{order_id}-{sequence}-charge",
        "order_id": order_id,
        "event": {"type": "charge", "sequence": sequence},
        "status": "charged",
        "order_number": "N-1",
    }


@pytest.mark.parametrize("destination", ["merchant", "erp"])
def test_the_dead_letter_entry_the_scripts_write_is_the_one_the_worker_writes(
    sync_redis: redis.Redis, destination: str
) -> None:
    """A dead letter written by a chain script (its destination removed) is, byte for byte, the entry
    `deadletters.entry` makes of the same update, attempts, reason and times."""
    keys = RedisKeys() if destination == "merchant" else RedisKeys().for_destination(destination)
    order_id = "Owners00000001"
    update = update_of(order_id, 0)
    job = keys.job_id(update["id"])
    sync_redis.set(keys.order_head(order_id), job)
    sync_redis.sadd(keys.active_orders, order_id)
    sync_redis.hset(keys.pending_updates, job, update_json(update))
    sync_redis.hset(keys.delivery(job), mapping={"attempts": 2, "earlier_attempts": 3})
    assert OrderChains(sync_redis, keys, 3600).drop_all() == 1

    raw = sync_redis.hget(keys.dead_letters, job)
    assert isinstance(raw, bytes)
    stored = orjson.loads(raw)
    assert stored["attempts"] == 5 and stored["last_error"] == history.DESTINATION_REMOVED_REASON
    assert stored["last_error_at"] == stored["dead_lettered_at"]
    made = orjson.loads(
        deadletters.entry(
            job, update, destination, 5, history.DESTINATION_REMOVED_REASON, stored["last_error_at"]
        )
    )
    made["dead_lettered_at"] = stored["dead_lettered_at"]  # the Python writer stamps its own now
    assert raw == orjson.dumps(made)
    assert deadletters.destination_of(stored) == destination
    # and the history's entry the script wrote is the one history.entry makes of the same step
    last = sync_redis.lrange(keys.history(order_id), -1, -1)[0]  # type: ignore[index]
    told = None if destination == "merchant" else destination
    assert last == history.entry(
        history.DESTINATION_REMOVED, stored["dead_lettered_at"], update="0-charge", destination=told
    )

"""Intergiro Error notes: what is kept of an Error object posted to the callback URL, for ops.

Error objects arrive unsigned, so anyone who can reach the callback URL can post one. What is kept of
them is bounded in count, size and time (a note is at most a few KiB: five short fields and three of
its `content`), so no flood of them can fill Redis and push it to refuse signed callbacks. This module
owns the record: its format, its bounds, its writer and its reader (the ops console's overview).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import orjson
from redis.asyncio import Redis

from receiver.connections import deadline
from receiver.errors import clip

ERROR_NOTES_KEPT = 200
ERROR_NOTE_TEXT_CHARS = 200
ERROR_NOTES_TTL_SECONDS = 7 * 86400
# Fields of an Intergiro Error object worth keeping: its `content` may carry a 3-D Secure `pareq`,
# which embeds the card number, so only these are ever logged or stored.
ERROR_FIELDS = ("status", "type", "error", "description", "id")
ERROR_CONTENT_FIELDS = ("property", "type", "description")


def error_note(error: dict[str, Any], received_at: str) -> dict[str, Any]:
    """What is kept of an Error object: the allowlisted fields only, each text cut short."""
    raw_content = error.get("content")
    content: dict[str, Any] = raw_content if isinstance(raw_content, dict) else {}
    note: dict[str, Any] = {}
    for name in ERROR_FIELDS:
        value = error.get(name)
        if isinstance(value, str):
            note[name] = clip(value, ERROR_NOTE_TEXT_CHARS)
        elif isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 1000:
            note[name] = value
    note["content"] = {
        k: clip(content[k], ERROR_NOTE_TEXT_CHARS)
        for k in ERROR_CONTENT_FIELDS
        if isinstance(content.get(k), str)
    }
    note["received_at"] = received_at
    return note


async def keep_error_note(redis: Redis, key: str, note: dict[str, Any], timeout_seconds: float) -> int:
    """Push `note` on the bounded, expiring list at `key`; returns how many older notes it pushed out
    (0 mostly). Raises redis-py's RedisError when Redis did not keep it."""
    # One transaction: the list is never left longer than its bound or without its expiry.
    async with deadline(redis, timeout_seconds), redis.pipeline(transaction=True) as pipe:
        pipe.lpush(key, orjson.dumps(note))
        pipe.ltrim(key, 0, ERROR_NOTES_KEPT - 1)
        pipe.expire(key, ERROR_NOTES_TTL_SECONDS)
        length, _, _ = await pipe.execute()
    return max(int(length) - ERROR_NOTES_KEPT, 0)


def read_error_notes(raw: Iterable[bytes]) -> list[dict[str, Any]]:
    """The notes as the list at the key holds them (newest first), e.g. from an LRANGE of it."""
    return [orjson.loads(note) for note in raw]

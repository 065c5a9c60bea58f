"""The delivery record: one Redis hash per delivery job (`RedisKeys.delivery`), what the attempts at it
have left so far: how many were counted (`attempts`, each counted as it starts, so a worker that dies
mid-POST still spent one), those of before a requeue (`earlier_attempts`, so that a dead letter says
them all), the last failure (`last_error`, `last_error_at`), whether a replay queued it (`replay`), and
which of a destination's several targets already took it (`done:<target>`). Written by the chain's and
the retry schedule's scripts (the fragment below) and by the worker (`count_attempt`, `mark_done`);
gone once the update is delivered or dead-lettered."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from redis.client import Pipeline

from receiver.redistext import text

ATTEMPTS = "attempts"
EARLIER_ATTEMPTS = "earlier_attempts"
LAST_ERROR = "last_error"
LAST_ERROR_AT = "last_error_at"
REPLAY = "replay"
DONE_PREFIX = "done:"

# The record's writes and reads in a script: `record` is the record's key.
LUA = """
local function attempts_so_far(record)
  return tonumber(redis.call('HGET', record, 'attempts') or '0')
    + tonumber(redis.call('HGET', record, 'earlier_attempts') or '0')
end

local function keep_earlier_attempts(record, earlier)
  if earlier > 0 then redis.call('HSET', record, 'earlier_attempts', earlier) end
end

local function mark_replay(record)
  redis.call('HSET', record, 'replay', 1)
end

local function note_failure(record, error, at)
  redis.call('HSET', record, 'last_error', error, 'last_error_at', at)
end
"""


def count_attempt(pipe: Pipeline, key: str) -> None:
    """Count an attempt as it starts (on `pipe`, in the step that starts it)."""
    pipe.hincrby(key, ATTEMPTS, 1)


def read_attempts(pipe: Pipeline, key: str) -> None:
    """The attempts counted so far (on `pipe`: its answer is None for none)."""
    pipe.hget(key, ATTEMPTS)


def done_field(target: str) -> str:
    """The field that says `target` (one of a destination's targets) took the update already."""
    return DONE_PREFIX + target


@dataclass(frozen=True)
class DeliveryRecord:
    attempts: int
    earlier_attempts: int
    last_error: str | None
    last_error_at: str | None
    replay: bool
    done: frozenset[str]  # the targets that took it already

    @classmethod
    def parse(cls, fields: Mapping[Any, Any]) -> DeliveryRecord:
        """The record as HGETALL answered it (bytes or text)."""
        read = {text(k): text(v) for k, v in fields.items()}
        return cls(
            attempts=int(read.get(ATTEMPTS) or 0),
            earlier_attempts=int(read.get(EARLIER_ATTEMPTS) or 0),
            last_error=read.get(LAST_ERROR),
            last_error_at=read.get(LAST_ERROR_AT),
            replay=REPLAY in read,
            done=frozenset(k[len(DONE_PREFIX) :] for k in read if k.startswith(DONE_PREFIX)),
        )

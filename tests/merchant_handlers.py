"""MERCHANT_HANDLER functions for the worker tests; they count their calls in the suite's Redis."""

from __future__ import annotations

import os
from typing import Any

import redis

from receiver.handler_errors import PermanentDeliveryError

CALLS = "test:handler:calls"
DELIVERED = "test:handler:delivered"


def _client() -> redis.Redis:
    return redis.Redis.from_url(os.environ["REDIS_URL"])


def flaky(update: dict[str, Any]) -> None:
    """Raises on its first two calls, then takes the update."""
    client = _client()
    if client.incr(CALLS) <= 2:
        raise ConnectionError("merchant database not reachable")
    client.rpush(DELIVERED, update["id"])


def refuses(update: dict[str, Any]) -> None:
    _client().incr(CALLS)
    raise PermanentDeliveryError("unknown order number")


def takes(update: dict[str, Any]) -> None:
    _client().rpush(DELIVERED, update["id"])


BOOKS = "test:handler:books"


def books(update: dict[str, Any]) -> None:
    """A destination's handler (tests/test_fanout.py): records the update, whole."""
    import orjson

    _client().rpush(BOOKS, orjson.dumps(update))


ENTERED = "test:handler:entered"
RELEASE = "test:handler:release"


def holds(update: dict[str, Any]) -> None:
    """Says it has the update (ENTERED), then holds it until the test sets RELEASE (at most 30 s), then
    takes it: a delivery that stays in flight as long as a test needs to look at it."""
    import time

    client = _client()
    client.rpush(ENTERED, update["id"])
    deadline = time.monotonic() + 30
    while not client.exists(RELEASE) and time.monotonic() < deadline:
        time.sleep(0.01)
    client.rpush(DELIVERED, update["id"])

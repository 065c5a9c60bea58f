"""Redis clients for every process, made in one place: a plain URL, or Sentinel for failover."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from types import EllipsisType
from typing import Any
from urllib.parse import urlparse

import redis
import redis.asyncio
import redis.asyncio.retry
import redis.asyncio.sentinel
import redis.retry
import redis.sentinel
from redis.backoff import NoBackoff
from redis.exceptions import OutOfMemoryError, ReadOnlyError, RedisError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from receiver.settings import Settings

# A sentinel that does not answer is skipped at once for the next one: redis-py's default retries with
# backoff at every sentinel made a receiver take 6 to 9 s to answer 503 when no master was known.
SENTINEL_OPTIONS: dict[str, Any] = {"socket_timeout": 1.0, "socket_connect_timeout": 1.0}


def _master_options(settings: Settings, timeout: float | None) -> dict[str, Any]:
    url = urlparse(settings.redis_url)
    db = int(url.path.lstrip("/") or 0) if url.scheme in ("redis", "rediss") else 0
    return {
        "db": db,
        "password": url.password,
        "username": url.username,
        "socket_timeout": timeout,
        "socket_connect_timeout": _connect_timeout(timeout),
    }


def _connect_timeout(timeout: float | None) -> float:
    return 2.0 if timeout is None else min(timeout, 2.0)


def async_redis(settings: Settings, timeout: float | EllipsisType | None = ...) -> redis.asyncio.Redis:
    """The receiver's client (never blocks the event loop), its socket timeout REDIS_TIMEOUT_SECONDS
    unless given; `timeout=None` for a caller that bounds its own calls (the intake), connecting still
    gives up after 2 s. Bound each call as a whole with `deadline`: redis-py retries a timed-out call."""
    if timeout is ...:
        timeout = settings.redis_timeout_seconds
    if settings.redis_sentinels:
        sentinel = redis.asyncio.sentinel.Sentinel(  # type: ignore[no-untyped-call]
            list(settings.redis_sentinels),
            sentinel_kwargs={**SENTINEL_OPTIONS, "retry": redis.asyncio.retry.Retry(NoBackoff(), 0)},
        )
        master: redis.asyncio.Redis = sentinel.master_for(
            settings.redis_sentinel_master, **_master_options(settings, timeout)
        )
        return master
    return redis.asyncio.Redis.from_url(
        settings.redis_url, socket_timeout=timeout, socket_connect_timeout=_connect_timeout(timeout)
    )


@asynccontextmanager
async def deadline(client: redis.asyncio.Redis, seconds: float) -> AsyncIterator[None]:
    """Bound the Redis calls made inside to `seconds` in all (connecting, retries and answers); past it,
    raise redis's TimeoutError (a RedisError) and drop every pooled connection: one cut off mid-handshake
    would otherwise be handed out again half set up, and a Redis that hangs has them all stuck."""
    try:
        async with asyncio.timeout(seconds):
            yield
    except TimeoutError:
        await client.connection_pool.disconnect()
        raise RedisTimeoutError(f"no answer from Redis within {seconds:g} s") from None


def sync_redis(settings: Settings, timeout: float = 5.0) -> redis.Redis:
    """The workers' and the CLI's client."""
    if settings.redis_sentinels:
        sentinel = redis.sentinel.Sentinel(  # type: ignore[no-untyped-call]
            list(settings.redis_sentinels),
            sentinel_kwargs={**SENTINEL_OPTIONS, "retry": redis.retry.Retry(NoBackoff(), 0)},
        )
        master: redis.Redis = sentinel.master_for(  # type: ignore[no-untyped-call]
            settings.redis_sentinel_master, **_master_options(settings, timeout)
        )
        return master
    return redis.Redis.from_url(
        settings.redis_url, socket_timeout=timeout, socket_connect_timeout=min(timeout, 2.0)
    )


def write_refusal(exc: RedisError) -> str | None:
    """Why a reachable Redis refused a write (`out of memory`: maxmemory with noeviction; `read-only`:
    a replica; `script error`: our script failed), or None when it was not reached at all."""
    # Redis 6 reports a refusal met inside a script as the script's error, naming the refusal in its text.
    text = str(exc)
    if isinstance(exc, OutOfMemoryError) or (
        isinstance(exc, ResponseError) and "OOM command not allowed" in text
    ):
        return "out of memory"
    if isinstance(exc, ReadOnlyError) or (isinstance(exc, ResponseError) and "READONLY" in text):
        return "read-only"
    if isinstance(exc, ResponseError):
        return "script error"
    return None

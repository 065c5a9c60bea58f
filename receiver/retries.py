"""The retry schedule: how long a failed delivery waits before its next attempt, and when it gives up.

By default an update is retried for more than a day before it is dead-lettered (DAY_SCHEDULE: a merchant
that deploys for ten minutes, or is down for a night, loses nothing): the waits after attempts 1, 2, ...
are DELIVERY_RETRY_SCHEDULE's (`DESTINATION_<NAME>_RETRY_SCHEDULE` for another destination), each
lengthened by a random share of up to JITTER (so retries of updates that failed together spread out, and
the schedule never adds up to less than its sum). DELIVERY_BACKOFF_SECONDS, when set, chooses the
exponential backoff instead (full jitter over base * 2^(n-1), capped at one hour).
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable

# The waits after failed attempts 1..9 (10 attempts): 92 165 s, about 25.6 hours in all, so that even a
# merchant down for a whole day gets its updates once it is back. Stripe retries for three days, Svix for
# about a day; a day covers a deploy gone wrong, a night's outage and a weekend morning's fix.
DAY_SCHEDULE: tuple[float, ...] = (5, 60, 300, 1800, 3600, 7200, 14400, 28800, 36000)
JITTER = 0.1  # each wait grows by up to 10%: never shorter than the schedule says
MAX_RETRY_AFTER_SECONDS = 3600.0  # a merchant's Retry-After is honoured up to an hour
MAX_BACKOFF_SECONDS = 3600.0  # the exponential backoff's cap
EXPONENTIAL_MAX_ATTEMPTS = 8  # attempts of the exponential backoff unless DELIVERY_MAX_ATTEMPTS says
UNITS = {"": 1, "ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_duration(raw: str) -> float:
    """Seconds of `5`, `5s`, `250ms`, `1m`, `2h`, `1d`."""
    found = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d|)\s*", raw)
    if not found:
        raise ValueError(f"{raw.strip()!r} is not a duration (e.g. 30s, 5m, 2h)")
    return float(found[1]) * UNITS[found[2]]


def parse_schedule(raw: str) -> tuple[float, ...]:
    """A comma-separated list of waits (`5s,1m,5m,30m,1h`): at least one, at most 99, each at most a week."""
    waits = tuple(parse_duration(part) for part in raw.split(","))
    if len(waits) > 99:
        raise ValueError("at most 99 waits (100 attempts)")
    if any(w > 7 * 86400 for w in waits):
        raise ValueError("a wait is longer than a week")
    return waits


def format_duration(seconds: float) -> str:
    """`5s`, `1m`, `2h`, `1h30m`: how the docs and `destination list` show a wait."""
    if seconds < 1:
        return f"{seconds * 1000:g}ms"
    whole = round(seconds)
    parts = [
        (whole // 86400, "d"),
        (whole % 86400 // 3600, "h"),
        (whole % 3600 // 60, "m"),
        (whole % 60, "s"),
    ]
    return "".join(f"{n}{unit}" for n, unit in parts if n) or "0s"


def schedule_wait(
    schedule: tuple[float, ...],
    attempt: int,
    retry_after: float | None = None,
    rng: Callable[[], float] = random.random,
) -> float:
    """Seconds to wait after failed attempt number `attempt` (1-based): the schedule's wait for it (its
    last one past its end) lengthened by up to JITTER, never sooner than the merchant's Retry-After."""
    wait = schedule[min(attempt, len(schedule)) - 1] * (1 + JITTER * rng())
    if retry_after is not None:
        wait = max(wait, min(retry_after, MAX_RETRY_AFTER_SECONDS))
    return float(wait)


def backoff_delay(
    attempt: int, base: float, retry_after: float | None = None, rng: Callable[[], float] = random.random
) -> float:
    """The exponential backoff's wait after failed attempt number `attempt` (1-based): full jitter over
    base * 2^(n-1), capped at one hour, and never sooner than the merchant's Retry-After (itself capped
    at one hour)."""
    ceiling = min(MAX_BACKOFF_SECONDS, base * 2 ** min(attempt - 1, 64))
    delay = rng() * ceiling
    if retry_after is not None:
        delay = max(delay, min(retry_after, MAX_RETRY_AFTER_SECONDS))
    return float(delay)


def retry_wait(
    schedule: tuple[float, ...], backoff_seconds: float | None, attempt: int, retry_after: float | None = None
) -> float:
    """A destination's wait after failed attempt `attempt`: exponential when it has a backoff base, its
    schedule's otherwise."""
    if backoff_seconds is not None:
        return backoff_delay(attempt, backoff_seconds, retry_after)
    return schedule_wait(schedule, attempt, retry_after)


def attempts_of(schedule: tuple[float, ...], backoff_seconds: float | None, max_attempts: int | None) -> int:
    """Attempts before the dead-letter queue: DELIVERY_MAX_ATTEMPTS when set, else one more than the
    schedule's waits (EXPONENTIAL_MAX_ATTEMPTS with the exponential backoff)."""
    if max_attempts is not None:
        return max_attempts
    return EXPONENTIAL_MAX_ATTEMPTS if backoff_seconds is not None else len(schedule) + 1

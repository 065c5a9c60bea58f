"""The retry schedule: more than a day of retries by default, per destination overridable, and its
shape proven on real worker processes with the schedule shrunk."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest

from receiver.errors import ConfigError
from receiver.rediskeys import RedisKeys
from receiver.retries import DAY_SCHEDULE, JITTER, format_duration, parse_schedule, schedule_wait
from receiver.settings import Settings
from tests.sink import SECRET, Sink, log_events, wait_for
from tests.test_workers import post_order

DAY = 86400.0
# The default schedule's shape, 15 000 times shorter: 6.1 s of waits instead of 25.6 h.
SCALE = 15_000
SHRUNK = ",".join(f"{w * 1000 / SCALE:.3f}ms" for w in DAY_SCHEDULE)


def test_the_default_schedule_retries_for_more_than_a_day_whatever_the_jitter() -> None:
    s = Settings.from_env({})
    assert s.merchant.max_attempts == len(DAY_SCHEDULE) + 1 == 10
    for rng in (lambda: 0.0, lambda: 1.0):
        total = sum(schedule_wait(s.merchant.retry_schedule, n, rng=rng) for n in range(1, 10))
        assert DAY <= total <= DAY * 1.1 * (1 + JITTER)
    assert [format_duration(w) for w in DAY_SCHEDULE] == [
        "5s",
        "1m",
        "5m",
        "30m",
        "1h",
        "2h",
        "4h",
        "8h",
        "10h",
    ]


def test_a_wait_is_never_shorter_than_the_schedule_nor_than_retry_after() -> None:
    assert schedule_wait((5.0, 60.0), 1, rng=lambda: 0.0) == 5.0
    assert schedule_wait((5.0, 60.0), 2, rng=lambda: 1.0) == pytest.approx(66.0)
    assert schedule_wait((5.0, 60.0), 7, rng=lambda: 0.0) == 60.0  # past its end: the last wait again
    assert schedule_wait((5.0,), 1, retry_after=120, rng=lambda: 0.0) == 120.0
    assert schedule_wait((5.0,), 1, retry_after=10**6, rng=lambda: 0.0) == 3600.0


def test_a_destination_has_its_own_schedule_and_bad_ones_are_named() -> None:
    handler = {"DESTINATIONS": "erp", "DESTINATION_ERP_HANDLER": "tests.merchant_handlers:takes"}
    s = Settings.from_env({**handler, "DESTINATION_ERP_RETRY_SCHEDULE": "1s, 2m ,3h"})
    erp = s.destination("erp")
    assert erp is not None and (erp.retry_schedule, erp.max_attempts) == ((1.0, 120.0, 10800.0), 4)
    assert s.merchant.retry_schedule == DAY_SCHEDULE
    s = Settings.from_env({**handler, "DELIVERY_RETRY_SCHEDULE": "1m", "DELIVERY_MAX_ATTEMPTS": "3"})
    erp = s.destination("erp")
    assert erp is not None and (erp.retry_schedule, erp.max_attempts) == ((60.0,), 3)
    assert parse_schedule("250ms,1d") == (0.25, 86400.0)
    for env, variable in (
        ({"DELIVERY_RETRY_SCHEDULE": "5s,soon"}, "DELIVERY_RETRY_SCHEDULE"),
        ({"DELIVERY_RETRY_SCHEDULE": "8d"}, "DELIVERY_RETRY_SCHEDULE"),
        ({**handler, "DESTINATION_ERP_RETRY_SCHEDULE": ""}, None),
        ({**handler, "DESTINATION_ERP_RETRY_SCHEDULE": "-1s"}, "DESTINATION_ERP_RETRY_SCHEDULE"),
    ):
        if variable is None:
            Settings.from_env(env)
            continue
        with pytest.raises(ConfigError) as caught:
            Settings.from_env(env)
        assert [p.split(":")[0] for p in caught.value.problems] == [variable]


async def test_an_outage_of_half_the_shrunk_schedule_dead_letters_nothing_and_its_shape_holds(
    receiver: Any, rsa_key: Any, sink: Sink, workers: Any, sync_redis: Any, tmp_path: Path
) -> None:
    """With the default schedule's shape shrunk 15 000 times, a merchant down for 3 s (12.5 h at full
    scale) gets its update; one down for good gets it dead-lettered only after the schedule's ten
    attempts, each no sooner than its wait; a permanent 4xx is dead-lettered at once."""
    [back] = await post_order(receiver, rsa_key, "OutageBack000001")
    [gone] = await post_order(receiver, rsa_key, "OutageGone000001")
    [refused] = await post_order(receiver, rsa_key, "OutageRefused001")
    up_at = [float("inf")]  # 3 s after the first attempt at `back`

    def answer(update_id: str, n: int) -> tuple[int, dict[str, str], float]:
        if update_id == refused:
            return 404, {}, 0.0
        if update_id == back and n == 1:
            up_at[0] = time.time() + 3.0
        if update_id == back and time.time() >= up_at[0]:
            return 200, {}, 0.0
        return 503, {}, 0.0

    sink.answer = answer
    # the schedule's shape alone: no breaker (its probes, every few seconds, would space the attempts)
    workers(
        merchant_webhook_url=sink.url,
        merchant_webhook_secret=SECRET,
        delivery_retry_schedule=SHRUNK,
        breaker_failures=0,
        # the sink answers at once: a loaded machine's slow answer must not become a timed-out attempt,
        # which has no retry line of its own
        delivery_timeout_seconds=10,
    )
    dead = RedisKeys().dead_letters
    await wait_for(lambda: sync_redis.hexists(dead, gone), seconds=60, what="the update of the gone merchant")
    assert sync_redis.hexists(dead, refused)
    assert not sync_redis.hexists(dead, back)
    assert len(sink.attempts(refused)) == 1
    assert json.loads(sync_redis.hget(dead, refused))["attempts"] == 1
    delivered = sink.attempts(back)
    assert delivered[-1].at >= up_at[0] and 2 <= len(delivered) < 10
    attempts = sink.attempts(gone)
    assert len(attempts) == 10 and json.loads(sync_redis.hget(dead, gone))["attempts"] == 10
    retries = [
        e for e in log_events(tmp_path / "worker.log", "delivery retry scheduled") if e["update"] == gone
    ]
    assert [e["attempt"] for e in retries] == list(range(1, 10))
    for wait, retry, before, after in zip(DAY_SCHEDULE, retries, attempts[:-1], attempts[1:], strict=True):
        # the schedule's wait, lengthened by at most JITTER (retry_in is rounded to 0.1 ms) ...
        assert wait / SCALE - 0.0001 <= retry["retry_in"] <= wait / SCALE * (1 + JITTER) + 0.0001
        # ... and the next attempt reached the merchant no sooner (less a loaded machine's send delays)
        assert after.at - before.at >= retry["retry_in"] - 0.05
    assert sync_redis.hlen(dead) == 2

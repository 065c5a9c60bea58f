"""Callbacks per minute by outcome, for the ops console's overview."""

from __future__ import annotations

import time
from typing import Any

from receiver.rediskeys import RedisKeys

# Callbacks per minute by outcome (the ops console's overview) are kept this many minutes in Redis.
CALLBACK_MINUTES_KEPT = 120


class CallbackMinutes:
    """Callbacks per minute by outcome, for the ops console: counted in memory per process and added to
    one Redis hash per minute (summed over every process) by `flush` every few seconds, so counting
    costs a callback no round trip; a process that stops loses its last few seconds' counts (a
    final flush on the way out could hang a stop while Redis fails over). (The order histories hold
    verified callbacks only, spread over one key per order: no way to count rejections, nor cheap to
    read.)"""

    def __init__(self) -> None:
        self.pending: dict[tuple[int, str], int] = {}

    def count(self, outcome: str) -> None:
        key = (int(time.time()) // 60, outcome)
        self.pending[key] = self.pending.get(key, 0) + 1

    async def flush(self, redis: Any, keys: RedisKeys) -> None:
        """Add what was counted since the last flush (kept for the next one when Redis fails)."""
        if not self.pending:
            return
        taken, self.pending = self.pending, {}
        try:
            async with redis.pipeline(transaction=False) as pipe:
                for (minute, outcome), amount in taken.items():
                    pipe.hincrby(keys.callback_minute(minute), outcome, amount)
                    pipe.expire(keys.callback_minute(minute), CALLBACK_MINUTES_KEPT * 60)
                await pipe.execute()
        except Exception:  # Redis failed: count them next time
            oldest = int(time.time()) // 60 - CALLBACK_MINUTES_KEPT
            for key, amount in taken.items():
                if key[0] > oldest:
                    self.pending[key] = self.pending.get(key, 0) + amount
            raise

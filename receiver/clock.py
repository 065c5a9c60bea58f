"""UTC timestamps as the receiver writes them: ISO 8601 with milliseconds, `2026-11-23T13:20:00.123Z`.

A busy receiver stamps every callback three times (its `received_at`, its RQ jobs, its log line), a few
callbacks each millisecond: the text is formatted once per millisecond and reused.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime

_last: tuple[int, str] = (-1, "")  # (millisecond, its text): one tuple, so threads never see a mix


def utc_now() -> str:
    """Now, to the millisecond, in UTC."""
    global _last
    millisecond = time.time_ns() // 1_000_000
    if _last[0] != millisecond:
        moment = datetime.fromtimestamp(millisecond / 1000, UTC)
        _last = (millisecond, moment.isoformat(timespec="milliseconds")[:-6] + "Z")
    return _last[1]

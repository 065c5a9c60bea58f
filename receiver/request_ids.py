"""A callback's request id: the one its sender gave (`X-Request-ID`, a W3C `traceparent`), else one made
here; every log line and history entry of the callback carries it."""

from __future__ import annotations

import re
import uuid
from collections.abc import Mapping

_REQUEST_ID = re.compile(r"[A-Za-z0-9._:/+=-]{1,64}")
_TRACEPARENT = re.compile(r"[0-9a-f]{2}-([0-9a-f]{32})-[0-9a-f]{16}-[0-9a-f]{2}")


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

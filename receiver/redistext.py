"""Redis' answers read as text. The product's clients keep redis-py's bytes (job hashes and JSON are
read as bytes), so a member, a field or a script's answer arrives as bytes, a number, or None (a
missing key, Lua's false)."""

from __future__ import annotations

from typing import Any


def text(value: Any) -> str:
    """`value` as text: bytes decoded (UTF-8), None as '', anything else through str()."""
    if value is None:
        return ""
    return value.decode() if isinstance(value, bytes) else str(value)

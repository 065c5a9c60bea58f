"""The stream destination (DESTINATION_<NAME>_STREAM): each update appended once to a Redis Stream in the
same Redis, in its order's sequence, for consumers in any language (docs/update-v1.md).

The append is not a request of its own: it is made by the script that finishes the delivery and moves
the order's chain on (receiver.chains FINISH), so an update is appended exactly when its chain advances,
and a crash before that step leaves it to be appended by the attempt that recovers it, never twice.
"""

from __future__ import annotations

from typing import Any


class StreamTarget:
    """A Redis Stream as a destination's target: its key and the length it is trimmed to."""

    name = "stream"

    def __init__(self, key: str, maxlen: int) -> None:
        self.key = key
        self.maxlen = maxlen

    def __call__(self, update: dict[str, Any], replay: bool = False) -> None:
        """Nothing to send: the finishing step appends the update (see the module's docstring)."""

    @property
    def finish_args(self) -> tuple[str, int]:
        return self.key, self.maxlen

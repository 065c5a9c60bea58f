"""Normalization: the updates a callback turns into, whatever order its events arrive in."""

from __future__ import annotations

from typing import Any

from hypothesis import given, settings

from receiver.order import EVENT_TYPES, build_updates, parse_order
from tests.helpers import assert_valid_update
from tests.test_status import orders


def as_callback(order: dict[str, Any]) -> dict[str, Any]:
    return {**order, "id": "PropOrder0000001", "payment": {"type": "card", "card": "secret-token"}}


def updates_of(order: dict[str, Any]) -> list[dict[str, Any]]:
    return build_updates(
        parse_order(as_callback(order)), received_at="2026-11-23T00:00:00Z", verified_by="remote"
    )


@settings(max_examples=200, deadline=None)
@given(orders())
def test_progressive_callbacks_queue_the_same_updates_as_one_callback(order: dict[str, Any]) -> None:
    """[e0], then [e0, e1], then [e0, e1, e2] give, event by event, what [e0, e1, e2] gives at once."""
    events = [e for e in order["event"] if e["type"] in EVENT_TYPES]  # unknown types are refused with 400
    order = {**order, "event": events}
    if not events:
        return
    all_at_once = updates_of(order)
    one_by_one = [updates_of({**order, "event": events[: n + 1]})[n] for n in range(len(events))]
    assert one_by_one == all_at_once
    assert [u["event"]["sequence"] for u in all_at_once] == list(range(len(events)))
    for update in all_at_once:
        assert_valid_update(update)
        assert "secret-token" not in str(update)

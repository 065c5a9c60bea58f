"""The normalization as first written (receiver/order.py at fd319ed): plain and slow, kept as the model.
It shares receiver/order.py's constants and the helpers that did not change; the procedure is its own.

receiver/order.py does the same work with fewer calls and allocations; tests/test_order.py checks that it
gives exactly what this does (same updates, same key order, same numbers and types, same reasons). The
statuses here come from `status_history` and `order_amount`, each computed on its own, where
receiver/order.py computes both at once (`history_and_amount`).
"""

from __future__ import annotations

from collections.abc import Mapping
from decimal import Decimal
from typing import Any

from receiver.errors import BadCallback
from receiver.order import (  # the spec both share: limits, allowlists, patterns, and unchanged helpers
    _CURRENCY,
    _ORDER_ID,
    CATEGORIES,
    CREATED_EVENT,
    EVENT_FIELDS,
    EVENT_TYPES,
    MAX_DEPTH,
    MAX_EVENTS,
    MAX_ITEMS,
    PAYMENT_FIELDS,
    UPDATE_VERSION,
    _money,
    snake,
    update_id,
)
from receiver.status import MAX_NUMBER, StatusError, minor_units, order_amount, status_history


def snake_keys(value: Any, depth: int = 0) -> Any:
    """Object keys to snake_case, recursively (bounded: callers validated the depth already)."""
    if depth > 32:
        raise BadCallback("order is nested too deeply")
    if isinstance(value, dict):
        return {snake(str(k)): snake_keys(v, depth + 1) for k, v in value.items()}
    if isinstance(value, list):
        return [snake_keys(v, depth + 1) for v in value]
    return value


def _is_number(value: Any) -> bool:
    return (
        isinstance(value, int | float) and not isinstance(value, bool) and -MAX_NUMBER <= value <= MAX_NUMBER
    )


def _nested_within(value: Any, limit: int) -> bool:
    """Whether no object or list sits deeper than `limit` (level by level: a hostile depth cannot recurse)."""
    level = [value] if isinstance(value, dict | list) else []
    depth = 0
    while level:
        if depth >= limit:
            return False
        below: list[Any] = []
        for current in level:
            children = current.values() if isinstance(current, dict) else current
            below += [child for child in children if isinstance(child, dict | list)]
        level = below
        depth += 1
    return True


def _require(condition: bool, reason: str) -> None:
    if not condition:
        raise BadCallback(reason)


def _check_item(item: Any, where: str) -> None:
    _require(isinstance(item, dict), f"{where} is not an item")
    _require(_is_number(item.get("price")), f"{where}.price is not a number")
    for name in ("quantity", "vat", "rebate"):
        _require(item.get(name) is None or _is_number(item[name]), f"{where}.{name} is not a number")
    _require(item.get("quantity") is None or item["quantity"] >= 0, f"{where}.quantity is negative")
    for name in ("number", "name", "unit"):
        _require(item.get(name) is None or isinstance(item[name], str), f"{where}.{name} is not a string")


def _check_items(items: Any, where: str) -> None:
    if _is_number(items):
        _require(items >= 0, f"{where} is negative")
    elif isinstance(items, dict):
        _check_item(items, where)
    elif isinstance(items, list):
        _require(len(items) <= MAX_ITEMS, f"{where} holds more than {MAX_ITEMS} items")
        for index, item in enumerate(items):
            _check_item(item, f"{where}[{index}]")
    else:
        raise BadCallback(f"{where} is not a number, an item or a list of items")


def parse_order(body: Any) -> dict[str, Any]:
    """Check that a trusted JSON value is an order we can normalize; raises BadCallback naming the field."""
    _require(isinstance(body, dict), "body is not an order object")
    order: dict[str, Any] = body
    # Deeper JSON than this cannot be serialized into the job (orjson stops at 255 levels).
    _require(_nested_within(order, MAX_DEPTH), f"order is nested more than {MAX_DEPTH} levels deep")
    _require(
        isinstance(order.get("id"), str) and bool(_ORDER_ID.fullmatch(order["id"])),
        "order id is missing or malformed",
    )
    _require(
        isinstance(order.get("currency"), str) and bool(_CURRENCY.fullmatch(order["currency"])),
        "order currency is not ISO 4217",
    )
    _require("items" in order, "order has no items")
    _check_items(order["items"], "items")
    _require(isinstance(order.get("payment"), dict), "order payment is not an object")
    _require(isinstance(order["payment"].get("type"), str), "order payment.type is not a string")
    for name in ("number", "created", "client"):
        _require(order.get(name) is None or isinstance(order[name], str), f"order {name} is not a string")
    _require(order.get("category") in CATEGORIES, "order category is not purchase or withdrawal")
    _require(
        order.get("customer") is None or isinstance(order["customer"], str | dict),
        "order customer is not an id or a contact",
    )
    events = order.get("event", [])
    _require(isinstance(events, list), "order event is not a list")
    _require(len(events) <= MAX_EVENTS, f"order has more than {MAX_EVENTS} events")
    for index, event in enumerate(events):
        where = f"event[{index}]"
        _require(isinstance(event, dict), f"{where} is not an object")
        _require(
            isinstance(event.get("type"), str) and event["type"] in EVENT_TYPES,
            f"{where}.type is not a known event type",
        )
        _require(isinstance(event.get("date"), str), f"{where}.date is not a string")
        if "items" in event:
            _check_items(event["items"], f"{where}.items")
        if event["type"] == "settle":
            _require(event.get("net") is None or _is_number(event["net"]), f"{where}.net is not a number")
    return order


def _is_json_type(value: Any, kind: str) -> bool:
    return {
        "string": isinstance(value, str),
        "array": isinstance(value, list),
        "object": isinstance(value, dict),
        "number": _is_number(value),
        "any": True,
    }[kind]


def _carried(source: Mapping[str, Any], fields: Mapping[str, str], where: str) -> dict[str, Any]:
    """The allowlisted fields of a snake_cased object, each of the type the update schema promises."""
    carried = {name: source[name] for name in fields if source.get(name) is not None}
    for name, value in carried.items():
        _require(_is_json_type(value, fields[name]), f"{where}.{name} is not a {fields[name]}")
    return carried


def _payment(payment: Mapping[str, Any]) -> dict[str, Any]:
    return _carried({snake(str(k)): v for k, v in payment.items()}, PAYMENT_FIELDS, "payment")


def _event(event: Mapping[str, Any], sequence: int) -> dict[str, Any]:
    carried = _carried(snake_keys(dict(event)), EVENT_FIELDS, f"event[{sequence}]")
    return {"type": event["type"], "date": event["date"], "sequence": sequence, **carried}


def build_updates(order: Mapping[str, Any], *, received_at: str, verified_by: str) -> list[dict[str, Any]]:
    """One order-status update per event of a parsed order (one `created` update when it has none)."""
    try:
        history, amount = status_history(order), order_amount(order)
    except (StatusError, ArithmeticError) as exc:
        raise BadCallback(f"order amounts cannot be computed: {exc}") from None
    # An item may carry a discount, but no amount an update reports can be less than nothing.
    _require(
        amount >= 0 and all(value >= 0 for _, buckets in history for value in buckets.values()),
        "order amounts are negative",
    )
    places = minor_units(order["currency"])
    base: dict[str, Any] = {
        "version": UPDATE_VERSION,
        "order_id": order["id"],
        "order_number": order.get("number"),
        "amount": _money(amount),
        "currency": order["currency"],
        "payment": _payment(order["payment"]),
        "customer": snake_keys(order["customer"])
        if isinstance(order.get("customer"), dict)
        else order.get("customer"),
        "meta": order.get("meta"),
        "category": order.get("category"),
        "received_at": received_at,
        "verified_by": verified_by,
    }
    events = order.get("event") or []
    if not events:
        statuses = {"created": _money(amount.quantize(Decimal(1).scaleb(-places)))} if amount else {}
        event = {"type": CREATED_EVENT, "date": order.get("created") or received_at, "sequence": -1}
        return [
            {
                **base,
                "id": update_id(order["id"], -1, CREATED_EVENT),
                "event": event,
                "status": "created",
                "statuses": statuses,
            }
        ]
    updates = []
    for sequence, (event, (status, buckets)) in enumerate(zip(events, history, strict=True)):
        updates.append(
            {
                **base,
                "id": update_id(order["id"], sequence, event["type"]),
                "event": _event(event, sequence),
                "status": status,
                "statuses": {name: _money(value) for name, value in buckets.items()},
            }
        )
    return updates

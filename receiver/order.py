"""From a trusted order to order-status updates (version 1): parse, normalize, one update per event.

Pure functions: no I/O. Intergiro writes orders in camelCase (2020 tokens) or snake_case (the API since
2021); both are read, and updates are always snake_case. `meta` is passed on untouched.
"""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Mapping
from decimal import Decimal
from typing import Any

from receiver.errors import BadCallback
from receiver.status import StatusError, minor_units, order_amount, status_history

UPDATE_VERSION = 1
EVENT_TYPES = frozenset(
    {"defer", "pend", "deny", "order", "cancel", "charge", "pay", "refund", "fail", "settle", "synchronize"}
)
# The event an order without events stands for: it exists, nothing has happened to it yet.
CREATED_EVENT = "created"
MAX_EVENTS = 1000
MAX_ITEMS = 1000
_ORDER_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")
_CURRENCY = re.compile(r"[A-Z]{3}")
_CAMEL = re.compile(r"(?<=[a-z0-9])([A-Z])")
# Payment fields an update carries: an allowlist, so a card token or a new secret field never leaks.
PAYMENT_FIELDS = ("type", "service", "status", "scheme", "iin", "last4", "expires", "reference", "method")
EVENT_FIELDS = (
    "reference",
    "original",
    "error",
    "descriptor",
    "period",
    "payout",
    "gross",
    "fee",
    "net",
    "currency",
)


@functools.lru_cache(maxsize=4096)  # a few dozen names recur in every order; the regex is the cost
def snake(name: str) -> str:
    """`schemeReference` → `scheme_reference`; snake_case names are left as they are."""
    return _CAMEL.sub(r"_\1", name).lower()


def snake_keys(value: Any, depth: int = 0) -> Any:
    """Object keys to snake_case, recursively (bounded: callers validated the depth already)."""
    if depth > 32:
        raise BadCallback("order is nested too deeply")
    if isinstance(value, dict):
        return {snake(str(k)): snake_keys(v, depth + 1) for k, v in value.items()}
    if isinstance(value, list):
        return [snake_keys(v, depth + 1) for v in value]
    return value


def is_error_object(body: Any) -> bool:
    """An Intergiro Error (`{status: 400, type: "missing property", ...}`), not an order."""
    return (
        isinstance(body, dict)
        and isinstance(body.get("status"), int)
        and not isinstance(body.get("status"), bool)
        and isinstance(body.get("type"), str)
    )


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


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
    _require(
        order.get("category") in (None, "purchase", "withdrawal"),
        "order category is not purchase or withdrawal",
    )
    for name in ("number", "created", "client"):
        _require(order.get(name) is None or isinstance(order[name], str), f"order {name} is not a string")
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
        _require(event.get("type") in EVENT_TYPES, f"{where}.type is not a known event type")
        _require(isinstance(event.get("date"), str), f"{where}.date is not a string")
        if "items" in event:
            _check_items(event["items"], f"{where}.items")
        if event["type"] == "settle":
            _require(event.get("net") is None or _is_number(event["net"]), f"{where}.net is not a number")
    return order


def event_key(sequence: int, event_type: str) -> str:
    """What identifies one event within its order: its place in the (append-only) list and its type."""
    return f"{sequence}:{event_type}"


def update_id(order_id: str, sequence: int, event_type: str) -> str:
    """The stable id of an (order, event): dedup key, RQ job id, `webhook-id` and `Idempotency-Key`."""
    if sequence < 0:
        return f"{order_id}-{event_type}"
    return f"{order_id}-{sequence}-{event_type}"


def _money(value: Decimal) -> float | int:
    """A Decimal already rounded to the minor unit, as the shortest JSON number."""
    return int(value) if value == value.to_integral_value() else float(value)


def _payment(payment: Mapping[str, Any]) -> dict[str, Any]:
    normalized = {snake(str(k)): v for k, v in payment.items()}
    return {name: normalized[name] for name in PAYMENT_FIELDS if normalized.get(name) is not None}


def _event(event: Mapping[str, Any], sequence: int) -> dict[str, Any]:
    normalized = snake_keys(dict(event))
    result: dict[str, Any] = {"type": event["type"], "date": event["date"], "sequence": sequence}
    for name in EVENT_FIELDS:
        if normalized.get(name) is not None:
            result[name] = normalized[name]
    return result


def build_updates(order: Mapping[str, Any], *, received_at: str, verified_by: str) -> list[dict[str, Any]]:
    """One order-status update per event of a parsed order (one `created` update when it has none)."""
    try:
        history = status_history(order)
        amount = order_amount(order)
    except StatusError as exc:
        raise BadCallback(f"order amounts cannot be computed: {exc}") from None
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

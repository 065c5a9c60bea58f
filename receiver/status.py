"""Order status after each event (provisional whole-order version; the per-unit model replaces it)."""

from __future__ import annotations

from collections.abc import Mapping
from decimal import Decimal, InvalidOperation
from typing import Any

STATUS_ORDER = (
    "created", "deferred", "pending", "denied", "ordered", "cancelled",
    "charged", "paid", "refunded", "settled", "synchronized",
)  # fmt: skip
_ANY_OPEN = ("synchronized", "created", "deferred", "pending")
_CHANGES: dict[str, tuple[tuple[str, ...], str]] = {
    "defer": (("synchronized", "created", "pending"), "deferred"),
    "pend": (("synchronized", "created", "deferred"), "pending"),
    "deny": (_ANY_OPEN, "denied"),
    "order": (_ANY_OPEN, "ordered"),
    "cancel": ((*_ANY_OPEN, "ordered"), "cancelled"),
    "charge": (("synchronized", "ordered"), "charged"),
    "pay": (("synchronized", "charged"), "paid"),
    "refund": (("synchronized", "charged", "paid"), "refunded"),
    "synchronize": (STATUS_ORDER, "synchronized"),
}
_ZERO_DECIMAL = frozenset({"JPY", "KRW", "ISK", "CLP", "VND", "XAF", "XOF", "UGX", "PYG", "RWF"})
_THREE_DECIMAL = frozenset({"BHD", "KWD", "OMR", "JOD", "TND", "IQD", "LYD"})


class StatusError(ValueError):
    """An order whose amounts or statuses cannot be computed."""


def minor_units(currency: str) -> int:
    return 0 if currency in _ZERO_DECIMAL else 3 if currency in _THREE_DECIMAL else 2


def change(status: str, event_type: str) -> str | None:
    rule = _CHANGES.get(event_type)
    return rule[1] if rule and status in rule[0] else None


def _dec(value: Any) -> Decimal:
    try:
        return Decimal(str(value))
    except InvalidOperation:
        raise StatusError(f"{value!r} is not a number") from None


def _line_amount(item: Mapping[str, Any]) -> Decimal:
    price, vat, rebate = (_dec(item.get(k) or 0) for k in ("price", "vat", "rebate"))
    return (price - rebate + vat) * _dec(item.get("quantity", 1))


def order_amount(order: Mapping[str, Any]) -> Decimal:
    items = order["items"]
    if isinstance(items, list):
        total = sum((_line_amount(i) for i in items), Decimal(0))
    elif isinstance(items, dict):
        total = _line_amount(items)
    else:
        total = _dec(items)
    return total.quantize(Decimal(1).scaleb(-minor_units(order.get("currency", ""))))


def status_history(order: Mapping[str, Any]) -> list[tuple[str, dict[str, Decimal]]]:
    amount = order_amount(order)
    current, previous, settled = "created", "created", Decimal(0)
    history = []
    for event in order.get("event") or []:
        moved = change(current, event.get("type", ""))
        if moved:
            current = previous = moved
        elif event.get("type") == "settle":
            settled += _dec(event.get("net") or 0)
            previous = "settled"
        buckets = {current: amount}
        if settled:
            buckets["settled"] = settled
        history.append((previous, buckets))
    return history

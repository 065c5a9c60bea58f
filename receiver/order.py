"""From a trusted order to order-status updates (version 1): parse, normalize, one update per event.

Pure functions: no I/O. Intergiro writes orders in camelCase (2020 tokens) or snake_case (the API since
2021); both are read, and updates are always snake_case. `meta` is passed on untouched.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable, Mapping
from decimal import Decimal
from typing import Any

from receiver.errors import BadCallback
from receiver.status import StatusError, history_and_amount, minor_units

UPDATE_VERSION = 1
EVENT_TYPES = frozenset(
    {"defer", "pend", "deny", "order", "cancel", "charge", "pay", "refund", "fail", "settle", "synchronize"}
)
# The event an order without events stands for: it exists, nothing has happened to it yet.
CREATED_EVENT = "created"
MAX_EVENTS = 1000
MAX_ITEMS = 1000
# Larger numbers are no real price or quantity, and would overflow floats and Decimal's precision.
MAX_NUMBER = 1e12
MAX_DEPTH = 32  # of nested objects and lists anywhere in an order (`meta` included)
_ORDER_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")
_CURRENCY = re.compile(r"[A-Z]{3}")
_CAMEL = re.compile(r"(?<=[a-z0-9])([A-Z])")
# Payment fields an update carries, with the JSON type the update schema promises: an allowlist, so a
# card token or a new secret field never leaks.
PAYMENT_FIELDS = {
    "type": "string", "service": "string", "status": "string", "scheme": "string", "iin": "string",
    "last4": "string", "expires": "array", "reference": "string", "method": "string",
}  # fmt: skip
EVENT_FIELDS = {
    "reference": "string", "original": "string", "error": "object", "descriptor": "string", "period": "any",
    "payout": "any", "gross": "number", "fee": "number", "net": "number", "currency": "string",
}  # fmt: skip
CATEGORIES = (None, "purchase", "withdrawal")
_CONTAINERS = (dict, list)
_SCALARS = frozenset({str, int, float, bool, type(None)})


@functools.lru_cache(maxsize=4096)  # a few dozen names recur in every order; the regex is the cost
def snake(name: str) -> str:
    """`schemeReference` → `scheme_reference`; snake_case names are left as they are."""
    return _CAMEL.sub(r"_\1", name).lower()


def snake_keys(value: Any, depth: int = 0) -> Any:
    """Object keys to snake_case, recursively (bounded: callers validated the depth already)."""
    # Refused as soon as anything, this value or one of its children, would sit more than 32 levels down.
    if depth > 32 or (depth == 32 and isinstance(value, _CONTAINERS) and value):
        raise BadCallback("order is nested too deeply")
    # Only containers recurse: most values are scalars, and a call per scalar is most of the cost.
    if isinstance(value, dict):
        return {
            snake(str(k)): snake_keys(v, depth + 1) if isinstance(v, _CONTAINERS) else v
            for k, v in value.items()
        }
    if isinstance(value, list):
        return [snake_keys(v, depth + 1) if isinstance(v, _CONTAINERS) else v for v in value]
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
    kind = type(value)
    # The exact types JSON gives are settled first: isinstance calls are a good part of parsing's cost.
    if (
        kind is not float
        and kind is not int
        and (not isinstance(value, int | float) or isinstance(value, bool))
    ):
        return False
    number: float = value
    return -MAX_NUMBER <= number <= MAX_NUMBER


def _nested_within(value: Any, limit: int) -> bool:
    """Whether no object or list sits deeper than `limit` (the recursion stops at `limit` levels)."""
    return not isinstance(value, _CONTAINERS) or _fits(value, limit)


def _fits(container: dict[Any, Any] | list[Any], room: int) -> bool:
    """Whether `container` and everything in it sit within `room` levels (it takes the first)."""
    if room <= 0:
        return False
    for child in container.values() if isinstance(container, dict) else container:
        # Most children are scalars: their exact type settles them before the isinstance call.
        if type(child) not in _SCALARS and isinstance(child, _CONTAINERS) and not _fits(child, room - 1):
            return False
    return True


def _require(condition: bool, reason: str) -> None:
    if not condition:
        raise BadCallback(reason)


# The item and items checks return what is wrong (the end of a reason, after the field's place) or None,
# so that the place, an f-string per item and event, is only spelled out for a bad order.


def _item_problem(item: Any) -> str | None:
    if not isinstance(item, dict):
        return " is not an item"
    if not _is_number(item.get("price")):
        return ".price is not a number"
    for name in ("quantity", "vat", "rebate"):
        value = item.get(name)
        if value is not None and not _is_number(value):
            return f".{name} is not a number"
    quantity = item.get("quantity")
    if quantity is not None and quantity < 0:
        return ".quantity is negative"
    for name in ("number", "name", "unit"):
        value = item.get(name)
        if value is not None and not isinstance(value, str):
            return f".{name} is not a string"
    return None


def _items_problem(items: Any) -> str | None:
    if _is_number(items):
        return None if items >= 0 else " is negative"
    if isinstance(items, dict):
        return _item_problem(items)
    if isinstance(items, list):
        if len(items) > MAX_ITEMS:
            return f" holds more than {MAX_ITEMS} items"
        for index, item in enumerate(items):
            problem = _item_problem(item)
            if problem is not None:
                return f"[{index}]{problem}"
        return None
    return " is not a number, an item or a list of items"


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
    problem = _items_problem(order["items"])
    if problem is not None:
        raise BadCallback(f"items{problem}")
    _require(isinstance(order.get("payment"), dict), "order payment is not an object")
    _require(isinstance(order["payment"].get("type"), str), "order payment.type is not a string")
    for name in ("number", "created", "client"):
        value = order.get(name)
        if value is not None and not isinstance(value, str):
            raise BadCallback(f"order {name} is not a string")
    _require(order.get("category") in CATEGORIES, "order category is not purchase or withdrawal")
    _require(
        order.get("customer") is None or isinstance(order["customer"], str | dict),
        "order customer is not an id or a contact",
    )
    events = order.get("event", [])
    _require(isinstance(events, list), "order event is not a list")
    _require(len(events) <= MAX_EVENTS, f"order has more than {MAX_EVENTS} events")
    for index, event in enumerate(events):
        if not isinstance(event, dict):
            raise BadCallback(f"event[{index}] is not an object")
        event_type = event.get("type")
        if not (isinstance(event_type, str) and event_type in EVENT_TYPES):
            raise BadCallback(f"event[{index}].type is not a known event type")
        if not isinstance(event.get("date"), str):
            raise BadCallback(f"event[{index}].date is not a string")
        if "items" in event:
            problem = _items_problem(event["items"])
            if problem is not None:
                raise BadCallback(f"event[{index}].items{problem}")
        if event_type == "settle" and event.get("net") is not None and not _is_number(event["net"]):
            raise BadCallback(f"event[{index}].net is not a number")
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


# What each JSON type of the update schema admits (`number` as the order's numbers, within MAX_NUMBER).
_OF_JSON_TYPE: dict[str, Callable[[Any], bool]] = {
    "string": lambda value: isinstance(value, str),
    "array": lambda value: isinstance(value, list),
    "object": lambda value: isinstance(value, dict),
    "number": _is_number,
    "any": lambda value: True,
}
_PLANS_SIZE = 1024
_PLAN_KEYS = 64  # most keys, and characters in all of them, of an object whose plan is remembered


class _Allowlist:
    """The fields an update carries from one kind of object (payment, event), each with the JSON type
    the update schema promises, read under whichever spelling the object uses (`lastFour`, `last_four`).

    Which key of an object feeds which field depends on its key names only, and a few sets of names
    recur in every callback, so that plan is remembered per tuple of key names.
    """

    def __init__(self, fields: Mapping[str, str]) -> None:
        self._fields = fields
        self._plans: dict[tuple[Any, ...], tuple[tuple[Any, str, str], ...]] = {}

    def carried(self, source: Mapping[Any, Any], where: str) -> dict[str, Any]:
        """The allowlisted fields of `source` that are not null, under their snake_case names, in the
        allowlist's order; BadCallback when one is not of its type."""
        keys = tuple(source)
        plan = self._plans.get(keys)
        if plan is None:
            plan = self._plan(keys)
        carried = {}
        for key, name, kind in plan:
            value = source[key]
            if value is not None:
                if not _OF_JSON_TYPE[kind](value):
                    raise BadCallback(f"{where}.{name} is not a {kind}")
                carried[name] = value
        return carried

    def _plan(self, keys: tuple[Any, ...]) -> tuple[tuple[Any, str, str], ...]:
        """(key, field, type) for each field some key spells, in the allowlist's order."""
        spelled_by = {snake(str(key)): key for key in keys}  # the last spelling wins, as in a dict of them
        plan = tuple(
            (spelled_by[name], name, kind) for name, kind in self._fields.items() if name in spelled_by
        )
        if len(keys) <= _PLAN_KEYS and sum(len(str(key)) for key in keys) <= _PLAN_KEYS * 16:
            if len(self._plans) >= _PLANS_SIZE:
                self._plans.clear()
            self._plans[keys] = plan
        return plan


_PAYMENT = _Allowlist(PAYMENT_FIELDS)
_EVENT = _Allowlist(EVENT_FIELDS)


def _event(event: Mapping[str, Any], sequence: int) -> dict[str, Any]:
    carried = _EVENT.carried(event, f"event[{sequence}]")
    for name, value in carried.items():
        if isinstance(value, _CONTAINERS):  # only the carried values need their keys snake_cased
            carried[name] = snake_keys(value, 1)
    return {"type": event["type"], "date": event["date"], "sequence": sequence, **carried}


def build_updates(order: Mapping[str, Any], *, received_at: str, verified_by: str) -> list[dict[str, Any]]:
    """One order-status update per event of a parsed order (one `created` update when it has none)."""
    try:
        history, amount = history_and_amount(order)
    except (StatusError, ArithmeticError) as exc:
        raise BadCallback(f"order amounts cannot be computed: {exc}") from None
    # An item may carry a discount, but no amount an update reports can be less than nothing.
    _require(amount >= 0, "order amounts are negative")
    # Most events' buckets hold the very same few Decimals (often the order amount itself): each is
    # checked and turned into a JSON number once, remembered by identity (hashing a Decimal costs more
    # than converting it; all of them live until the end of this call).
    numbers = {id(amount): _money(amount)}
    statuses = []
    for _, buckets in history:
        event_statuses = {}
        for name, value in buckets.items():
            number = numbers.get(id(value))
            if number is None:
                _require(value >= 0, "order amounts are negative")
                number = numbers[id(value)] = _money(value)
            event_statuses[name] = number
        statuses.append(event_statuses)
    base: dict[str, Any] = {
        "version": UPDATE_VERSION,
        "order_id": order["id"],
        "order_number": order.get("number"),
        "amount": numbers[id(amount)],
        "currency": order["currency"],
        "payment": _PAYMENT.carried(order["payment"], "payment"),
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
        places = minor_units(order["currency"])
        created = {"created": _money(amount.quantize(Decimal(1).scaleb(-places)))} if amount else {}
        event = {"type": CREATED_EVENT, "date": order.get("created") or received_at, "sequence": -1}
        return [
            {
                **base,
                "id": update_id(order["id"], -1, CREATED_EVENT),
                "event": event,
                "status": "created",
                "statuses": created,
            }
        ]
    return [
        {
            **base,
            "id": update_id(order["id"], sequence, event["type"]),
            "event": _event(event, sequence),
            "status": status,
            "statuses": event_statuses,
        }
        for sequence, (event, (status, _), event_statuses) in enumerate(
            zip(events, history, statuses, strict=True)
        )
    ]

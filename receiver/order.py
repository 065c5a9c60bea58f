"""From a trusted order to order-status updates (version 1): parse, normalize, one update per event.

Pure functions: no I/O. Intergiro writes orders in camelCase (2020 tokens) or snake_case (the API since
2021); both are read, and updates are always snake_case. `meta` is passed on untouched.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

import orjson

from receiver.errors import BadCallback, BodyTooLarge
from receiver.status import StatusError, history_and_amount, is_number, minor_units

UPDATE_VERSION = 1
EVENT_TYPES = frozenset(
    {"defer", "pend", "deny", "order", "cancel", "charge", "pay", "refund", "fail", "settle", "synchronize"}
)
# The event an order without events stands for: it exists, nothing has happened to it yet.
CREATED_EVENT = "created"
MAX_EVENTS = 1000
MAX_ITEMS = 1000
MAX_DEPTH = 32  # of nested objects and lists anywhere in an order (`meta` included)


@dataclass(frozen=True)
class OrderLimits:
    """How much of an order one callback may carry into its updates: `meta` and `customer` are copied
    into every update, so they and the number of events bound what one signed callback can queue
    (MAX_CALLBACK_EVENTS, MAX_META_BYTES, MAX_CUSTOMER_BYTES; sizes as compact JSON)."""

    max_events: int = 200
    max_meta_bytes: int = 16_384
    max_customer_bytes: int = 4_096


DEFAULT_LIMITS = OrderLimits()
_ORDER_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")
_UPDATE_ID = re.compile(
    r"(?P<order>[A-Za-z0-9_-]+?)-(?:(?P<sequence>\d+)-(?P<type>[a-z]+)|(?P<created>created))"
)
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


# The snake_case spelling of the key names seen lately: a dict look-up is a fraction of even a cached
# call, and every key of every customer goes through it. Bounded in names and in their length.
_SNAKED: dict[str, str] = {}
_SNAKED_SIZE = 4096
_SNAKED_LENGTH = 64


def _snaked(key: Any) -> str:
    name = snake(str(key))
    if type(key) is str and len(key) <= _SNAKED_LENGTH:
        if len(_SNAKED) >= _SNAKED_SIZE:
            _SNAKED.clear()
        _SNAKED[key] = name
    return name


def snake_keys(value: Any, depth: int = 0) -> Any:
    """Object keys to snake_case, recursively (bounded: callers validated the depth already)."""
    # Refused as soon as anything, this value or one of its children, would sit more than 32 levels down.
    if depth > 32 or (depth == 32 and isinstance(value, _CONTAINERS) and value):
        raise BadCallback("order is nested too deeply")
    # Only containers recurse: most values are scalars, settled by their exact type.
    if isinstance(value, dict):
        return {
            _SNAKED.get(k) or _snaked(k): snake_keys(v, depth + 1)
            if type(v) not in _SCALARS and isinstance(v, _CONTAINERS)
            else v
            for k, v in value.items()
        }
    if isinstance(value, list):
        return [
            snake_keys(v, depth + 1) if type(v) not in _SCALARS and isinstance(v, _CONTAINERS) else v
            for v in value
        ]
    return value


def is_error_object(body: Any) -> bool:
    """An Intergiro Error (`{status: 400, type: "missing property", ...}`), not an order."""
    return (
        isinstance(body, dict)
        and isinstance(body.get("status"), int)
        and not isinstance(body.get("status"), bool)
        and isinstance(body.get("type"), str)
    )


def _nested_within(value: Any, limit: int) -> bool:
    """Whether no object or list sits deeper than `limit` (`value` itself is level 0)."""
    # orjson, indenting, writes each member of an object or list on a line of its own, two spaces
    # deeper per level: a text without a line indented 2 * limit spaces holds nothing that deep. That
    # settles the usual order in C; one orjson cannot write, or with such a line (which may hold just a
    # scalar), is walked.
    try:
        text = orjson.dumps(value, option=orjson.OPT_INDENT_2)
    except orjson.JSONEncodeError:
        pass
    else:
        if b"\n" + b" " * (2 * limit) not in text:
            return True
    return not isinstance(value, _CONTAINERS) or _fits(value, limit)


def _fits(container: dict[Any, Any] | list[Any], room: int) -> bool:
    """Whether `container` (taking one level) and everything in it fit in `room` levels; the recursion
    stops when they do not, so a hostile depth cannot exhaust the stack."""
    if room <= 0:
        return False
    for child in container.values() if isinstance(container, dict) else container:
        # Most children are scalars: their exact type settles them before the isinstance call.
        if type(child) not in _SCALARS and isinstance(child, _CONTAINERS) and not _fits(child, room - 1):
            return False
    return True


# The item and items checks return what is wrong (the end of a reason, after the field's place) or None,
# so that the place, an f-string per item and event, is only spelled out for a bad order.


def _item_problem(item: Any) -> str | None:
    if not isinstance(item, dict):
        return " is not an item"
    if not is_number(item.get("price")):
        return ".price is not a number"
    quantity = item.get("quantity")
    if quantity is not None and not is_number(quantity):
        return ".quantity is not a number"
    for name in ("vat", "rebate"):
        value = item.get(name)
        if value is not None and not is_number(value):
            return f".{name} is not a number"
    if quantity is not None and quantity < 0:
        return ".quantity is negative"
    for name in ("number", "name", "unit"):
        value = item.get(name)
        if value is not None and not isinstance(value, str):
            return f".{name} is not a string"
    return None


def _items_problem(items: Any) -> str | None:
    if is_number(items):
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


def _json_size(value: Any) -> int:
    """Bytes of `value` as compact JSON (the parsers gave only values orjson writes)."""
    try:
        return len(orjson.dumps(value))
    except orjson.JSONEncodeError:
        raise BadCallback("order holds a value that cannot be written as JSON") from None


def parse_order(body: Any, limits: OrderLimits = DEFAULT_LIMITS) -> dict[str, Any]:
    """Check that a trusted JSON value is an order we can normalize; raises BadCallback naming the field
    (BodyTooLarge when it carries more than `limits` allow)."""
    if not isinstance(body, dict):
        raise BadCallback("body is not an order object")
    order: dict[str, Any] = body
    # Deeper JSON than this cannot be serialized into the job (orjson stops at 255 levels).
    if not _nested_within(order, MAX_DEPTH):
        raise BadCallback(f"order is nested more than {MAX_DEPTH} levels deep")
    order_id = order.get("id")
    if not (isinstance(order_id, str) and _ORDER_ID.fullmatch(order_id)):
        raise BadCallback("order id is missing or malformed")
    currency = order.get("currency")
    if not (isinstance(currency, str) and _CURRENCY.fullmatch(currency)):
        raise BadCallback("order currency is not ISO 4217")
    if "items" not in order:
        raise BadCallback("order has no items")
    problem = _items_problem(order["items"])
    if problem is not None:
        raise BadCallback(f"items{problem}")
    payment = order.get("payment")
    if not isinstance(payment, dict):
        raise BadCallback("order payment is not an object")
    if not isinstance(payment.get("type"), str):
        raise BadCallback("order payment.type is not a string")
    for name in ("number", "created", "client"):
        value = order.get(name)
        if value is not None and not isinstance(value, str):
            raise BadCallback(f"order {name} is not a string")
    if order.get("category") not in CATEGORIES:
        raise BadCallback("order category is not purchase or withdrawal")
    customer = order.get("customer")
    if customer is not None and not isinstance(customer, (str, dict)):
        raise BadCallback("order customer is not an id or a contact")
    events = order.get("event", [])
    if not isinstance(events, list):
        raise BadCallback("order event is not a list")
    if len(events) > min(MAX_EVENTS, limits.max_events):
        raise BodyTooLarge(f"order has more than {min(MAX_EVENTS, limits.max_events)} events")
    for name, limit in (("meta", limits.max_meta_bytes), ("customer", limits.max_customer_bytes)):
        value = order.get(name)
        if isinstance(value, str | dict | list) and _json_size(value) > limit:
            raise BodyTooLarge(f"order {name} is larger than {limit} bytes")
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
        if event_type == "settle" and event.get("net") is not None and not is_number(event["net"]):
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


def parse_update_id(update_id: str) -> tuple[str, int, str] | None:
    """(order id, sequence, event type) of an update id, or None when it is not one."""
    match = _UPDATE_ID.fullmatch(update_id)
    if match is None:
        return None
    if match.group("created"):
        return match.group("order"), -1, CREATED_EVENT
    if match.group("type") not in EVENT_TYPES:
        return None
    return match.group("order"), int(match.group("sequence")), match.group("type")


def _money(value: Decimal) -> float | int:
    """A Decimal already rounded to the minor unit, as the shortest JSON number."""
    return int(value) if value == value.to_integral_value() else float(value)


# What each JSON type of the update schema admits (`number` as the order's numbers, within MAX_NUMBER),
# and the exact type that settles it at a glance (most values are of it).
_OF_JSON_TYPE: dict[str, Callable[[Any], bool]] = {
    "string": lambda value: isinstance(value, str),
    "array": lambda value: isinstance(value, list),
    "object": lambda value: isinstance(value, dict),
    "number": is_number,
    "any": lambda value: True,
}
_EXACT_TYPE: dict[str, type | None] = {
    "string": str,
    "array": list,
    "object": dict,
    "number": None,
    "any": None,
}
_PLANS_SIZE = 1024
_PLAN_KEYS = 64  # most keys, and characters in all of them (x 16), of an object whose plan is remembered
_Plan = tuple[tuple[Any, str, str, "type | None"], ...]


class _Allowlist:
    """The fields an update carries from one kind of object (payment, event), each with the JSON type
    the update schema promises, read under whichever spelling the object uses (`lastFour`, `last_four`).

    Which key of an object feeds which field depends on its key names only, and a few sets of names
    recur in every callback, so that plan is remembered per tuple of key names.
    """

    def __init__(self, what: str, fields: Mapping[str, str], *, snake_nested: bool) -> None:
        self._what = what
        self._fields = fields
        self._snake_nested = snake_nested  # whether objects in the values get snake_case keys too
        self._plans: dict[tuple[Any, ...], _Plan] = {}

    def carry(self, source: Mapping[Any, Any], into: dict[str, Any], sequence: int = -1) -> dict[str, Any]:
        """`into`, with the allowlisted fields of `source` that are not null added under their snake_case
        names in the allowlist's order; BadCallback when one is not of its type (`sequence`: which event)."""
        keys = tuple(source)
        plan = self._plans.get(keys)
        if plan is None:
            plan = self._plan(keys)
        for key, name, kind, exact_type in plan:
            value = source[key]
            if value is not None:
                if type(value) is not exact_type and not _OF_JSON_TYPE[kind](value):
                    where = self._what if sequence < 0 else f"{self._what}[{sequence}]"
                    raise BadCallback(f"{where}.{name} is not a {kind}")
                if self._snake_nested and type(value) not in _SCALARS and isinstance(value, _CONTAINERS):
                    value = snake_keys(value, 1)
                into[name] = value
        return into

    def _plan(self, keys: tuple[Any, ...]) -> _Plan:
        """(key, field, type, exact type) for each field some key spells, in the allowlist's order."""
        spelled_by = {snake(str(key)): key for key in keys}  # the last spelling wins, as in a dict of them
        plan = tuple(
            (spelled_by[name], name, kind, _EXACT_TYPE[kind])
            for name, kind in self._fields.items()
            if name in spelled_by
        )
        if len(keys) <= _PLAN_KEYS and sum(len(str(key)) for key in keys) <= _PLAN_KEYS * 16:
            if len(self._plans) >= _PLANS_SIZE:
                self._plans.clear()
            self._plans[keys] = plan
        return plan


_PAYMENT = _Allowlist("payment", PAYMENT_FIELDS, snake_nested=False)
_EVENT = _Allowlist("event", EVENT_FIELDS, snake_nested=True)


def _event(event: Mapping[str, Any], sequence: int) -> dict[str, Any]:
    return _EVENT.carry(event, {"type": event["type"], "date": event["date"], "sequence": sequence}, sequence)


def build_updates(
    order: Mapping[str, Any], *, received_at: str, verified_by: str, repaired: Sequence[str] = ()
) -> list[dict[str, Any]]:
    """One order-status update per event of a parsed order (one `created` update when it has none);
    `repaired`: the places of the order whose value was repaired to be carried (`receiver.verify.
    repair_unwritable`), named in every update as `repaired`."""
    try:
        history, amount = history_and_amount(order)
    except (StatusError, ArithmeticError) as exc:
        raise BadCallback(f"order amounts cannot be computed: {exc}") from None
    # An item may carry a discount, but no amount an update reports can be less than nothing.
    if amount < 0:
        raise BadCallback("order amounts are negative")
    numbers: dict[int, float | int] = {id(amount): _money(amount)}
    statuses = [_event_statuses(buckets, numbers) for _, buckets in history]
    base = _update_base(order, numbers[id(amount)], received_at, verified_by, repaired)
    events = order.get("event") or []
    if not events:
        return [_created_update(base, order, amount, received_at)]
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


def _event_statuses(
    buckets: Mapping[str, Decimal], numbers: dict[int, float | int]
) -> dict[str, float | int]:
    """One event's status buckets as JSON numbers; BadCallback for a negative one. Most events' buckets
    hold the very same few Decimals (often the order amount itself): each is checked and turned into a
    JSON number once, remembered in `numbers` by identity (hashing a Decimal costs more than converting
    it; all of them live until the end of `build_updates`)."""
    event_statuses = {}
    for name, value in buckets.items():
        number = numbers.get(id(value))
        if number is None:
            if value < 0:
                raise BadCallback("order amounts are negative")
            number = numbers[id(value)] = _money(value)
        event_statuses[name] = number
    return event_statuses


def _update_base(
    order: Mapping[str, Any], amount: float | int, received_at: str, verified_by: str, repaired: Sequence[str]
) -> dict[str, Any]:
    """What every update of `order` carries, whatever its event (`amount`: the order's, as a number)."""
    base: dict[str, Any] = {
        "version": UPDATE_VERSION,
        "order_id": order["id"],
        "order_number": order.get("number"),
        "amount": amount,
        "currency": order["currency"],
        "payment": _PAYMENT.carry(order["payment"], {}),
        "customer": snake_keys(customer) if isinstance(customer := order.get("customer"), dict) else customer,
        "meta": order.get("meta"),
        "category": order.get("category"),
        "received_at": received_at,
        "verified_by": verified_by,
    }
    if repaired:
        base["repaired"] = list(repaired)
    return base


def _created_update(
    base: dict[str, Any], order: Mapping[str, Any], amount: Decimal, received_at: str
) -> dict[str, Any]:
    """The one update of an order without events: `created`, its amount in the currency's minor units."""
    places = minor_units(order["currency"])
    created = {"created": _money(amount.quantize(Decimal(1).scaleb(-places)))} if amount else {}
    return {
        **base,
        "id": update_id(order["id"], -1, CREATED_EVENT),
        "event": {"type": CREATED_EVENT, "date": order.get("created") or received_at, "sequence": -1},
        "status": "created",
        "statuses": created,
    }

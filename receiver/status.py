"""An order's status after each of its events, computed as Intergiro's own model does.

Pure: the decoded order JSON in, `Decimal` amounts per status out. The rules are in
`../shared/intergiro/README.md`, "How Intergiro computes an order's status": every unit starts at
`created` and the events are applied in list order; the status the callback itself carries is ignored.

The `created` bucket is listed like any other: present when non-zero, absent when zero.
"""

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from decimal import (
    ROUND_FLOOR,
    ROUND_HALF_EVEN,
    Context,
    Decimal,
    DecimalException,
    DivisionByZero,
    Inexact,
    InvalidOperation,
    Overflow,
    localcontext,
)
from typing import Any, Protocol, TypeGuard, TypeVar

STATUS_ORDER: tuple[str, ...] = (
    "created",
    "deferred",
    "pending",
    "denied",
    "ordered",
    "cancelled",
    "charged",
    "paid",
    "refunded",
    "settled",
    "synchronized",
)

MAX_NUMBER = 1e12
"""Largest price, quantity or amount (either sign) an order may hold: larger is no real price or
quantity, and would overflow floats and the precision of the exact sums."""
MAX_UNITS = 10_000
"""Most units (and most item lines) an order may have."""
MAX_EVENTS = 1_000
"""Most events an order may have."""
MAX_EVENT_LINES = 10_000
"""Most item lines all of an order's events may list together."""

# event type -> (statuses a unit can take it from, status it moves to); `synchronize` takes any status
# and `settle`, `fail` move no unit, so neither is here.
_MOVES: dict[str, tuple[frozenset[str], str]] = {
    "defer": (frozenset({"synchronized", "created", "pending"}), "deferred"),
    "pend": (frozenset({"synchronized", "created", "deferred"}), "pending"),
    "deny": (frozenset({"synchronized", "created", "deferred", "pending"}), "denied"),
    "order": (frozenset({"synchronized", "created", "deferred", "pending"}), "ordered"),
    "cancel": (frozenset({"synchronized", "created", "deferred", "pending", "ordered"}), "cancelled"),
    "charge": (frozenset({"synchronized", "ordered"}), "charged"),
    "pay": (frozenset({"synchronized", "charged"}), "paid"),
    "refund": (frozenset({"synchronized", "charged", "paid"}), "refunded"),
}

_ZERO_DECIMAL_CURRENCIES = frozenset(
    {"BIF", "CLP", "DJF", "GNF", "ISK", "JPY", "KMF", "KRW", "PYG", "RWF", "UGX", "UYI", "VND", "VUV"}
    | {"XAF", "XOF", "XPF"}
)
_THREE_DECIMAL_CURRENCIES = frozenset({"BHD", "IQD", "JOD", "KWD", "LYD", "OMR", "TND"})
_MINOR_UNITS = {code: 0 for code in _ZERO_DECIMAL_CURRENCIES} | {
    code: 3 for code in _THREE_DECIMAL_CURRENCIES
}

# Sums are exact or refused: an amount too large to add up exactly raises instead of drifting.
_EXACT = Context(prec=60, Emin=-99, Emax=99, traps=[InvalidOperation, Inexact, Overflow, DivisionByZero])
_ROUNDING = Context(prec=60, Emin=-99, Emax=99, traps=[InvalidOperation, Overflow, DivisionByZero])
_ZERO = Decimal(0)
_QUANTA = {places: Decimal(1).scaleb(-places) for places in (0, 2, 3)}  # what minor_units gives


class StatusError(ValueError):
    """The order's statuses cannot be computed: malformed amounts or quantities, or too much work."""


def change(status: str, event_type: str) -> str | None:
    """The status a unit in `status` moves to on `event_type`, or None when it cannot take it."""
    if status not in STATUS_ORDER:
        return None
    if event_type == "synchronize":
        return "synchronized"
    rule = _MOVES.get(event_type)
    if rule is None or status not in rule[0]:
        return None
    return rule[1]


# change() as a table, for the short path: (status, event type) -> the status it moves to
_CHANGES = {
    (status, event_type): target
    for status in STATUS_ORDER
    for event_type in [*_MOVES, "synchronize"]
    if (target := change(status, event_type)) is not None
}


def status_history(order: Mapping[str, Any]) -> list[tuple[str, dict[str, Decimal]]]:
    """For each event of order["event"] in list order: (the update's status, the status map right after that event).

    Raises StatusError for an order whose statuses cannot be computed.
    """
    return _guarded(_history, order)


def order_amount(order: Mapping[str, Any]) -> Decimal:
    """The order's amount (its items' total) in the currency's minor unit; StatusError when it has none."""
    return _guarded(_amount_of, order)


def history_and_amount(order: Mapping[str, Any]) -> tuple[list[tuple[str, dict[str, Decimal]]], Decimal]:
    """`status_history(order)` and `order_amount(order)` together, as the receiver needs both.

    The common callback (whole-order events, no event listing `items`, plain item lines) takes a
    short path that gives the very same result; anything else takes the general model.
    """
    try:
        fast = _whole_order_history(order) if isinstance(order, dict) else None
    except (DecimalException, ValueError, TypeError, KeyError, AttributeError, IndexError):
        fast = None  # the general model names the problem
    if fast is not None:
        return fast
    return status_history(order), order_amount(order)


def minor_units(currency: str) -> int:
    """How many decimals the currency's amounts have: 2 unless ISO 4217 says 0 (JPY, KRW, ISK...) or 3."""
    return _MINOR_UNITS.get(currency.upper(), 2) if isinstance(currency, str) else 2


def is_number(value: Any) -> TypeGuard[int | float]:
    """Whether `value` is a number as an order holds one: an int or a float within ±MAX_NUMBER, not a bool.

    Not a Decimal either: an order is JSON, which is read as ints and floats, and an update carrying a
    Decimal could not be written (orjson refuses it), so the status model and `parse_order` accept the
    same numbers.
    """
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


_T = TypeVar("_T")


def _guarded(compute: Callable[[Mapping[str, Any]], _T], order: Mapping[str, Any]) -> _T:
    """Compute with exact decimals, and let bad data out only as StatusError."""
    try:
        if not isinstance(order, Mapping):
            raise StatusError("the order is not an object")
        with localcontext(_EXACT):
            return compute(order)
    except StatusError:
        raise
    except (DecimalException, ValueError, TypeError, KeyError, AttributeError, IndexError) as error:
        # Backstop: the checks should name the problem first, but bad data never escapes as another type.
        raise StatusError(f"cannot compute the order's status: {error!r}") from error


def _places(order: Mapping[str, Any]) -> int:
    return minor_units(order.get("currency", ""))


def _buckets(order: Mapping[str, Any], places: int) -> "_Buckets":
    """The order's amount, all of it still `created`."""
    items = order.get("items")
    if is_number(items):
        return _AmountBuckets(_amount(items, "items", places), places)
    return _UnitBuckets(_lines(items, "items"))


def _amount_of(order: Mapping[str, Any]) -> Decimal:
    places = _places(order)
    return _round(_buckets(order, places).total(), places)


def _history(order: Mapping[str, Any]) -> list[tuple[str, dict[str, Decimal]]]:
    places = _places(order)
    events = _events(order.get("event"))
    buckets = _buckets(order, places)
    result: list[tuple[str, dict[str, Decimal]]] = []
    previous = "created"
    settled = Decimal(0)
    for event in events:
        event_type = event.get("type")
        if event_type == "settle":
            settled += _number(event.get("net"), "settle net")
            previous = "settled"
        elif isinstance(event_type, str) and event_type != "fail":
            previous = buckets.apply(event_type, event.get("items")) or previous
        statuses = {**_round_to_total(buckets.exact(), places), "settled": _round(settled, places)}
        result.append(
            (previous, {status: statuses[status] for status in STATUS_ORDER if statuses.get(status)})
        )
    return result


def _whole_order_history(
    order: Mapping[str, Any],
) -> tuple[list[tuple[str, dict[str, Decimal]]], Decimal] | None:
    """The history when no event lists items, or None (then the general model decides).

    Every event then offers every unit (or the whole amount), so all of the order's units are in one
    status at any time: the buckets are that status holding the whole amount, and `settled` beside it.
    Rounding one bucket to the total is rounding the total: the bucket is the order amount.

    The arithmetic names its context (`_EXACT`) instead of entering a local one, which costs more than
    the sums of a small order.
    """
    events = order.get("event")
    if events is None:
        events = []
    if type(events) is not list or len(events) > MAX_EVENTS:
        return None
    for event in events:
        if type(event) is not dict or event.get("items") is not None:
            return None
    places = minor_units(order.get("currency", ""))
    items = order.get("items")
    if type(items) is dict:
        items = [items]
    if type(items) is list:
        if len(items) > MAX_UNITS:
            return None
        units = 0
        total = _ZERO
        for index, item in enumerate(items):
            line = _cached_line(item)
            if line is None:
                return None
            units += line[0]
            # 0 + the first amount would only respell it (the total is only used rounded)
            total = _EXACT.add(total, line[1]) if index else line[1]
        if units > MAX_UNITS:
            return None
        movable = units > 0
        amount = _round(total, places)
    elif is_number(items):
        total = _round(_number(items, "items"), places)
        if total < 0:
            return None
        movable = total > 0
        amount = _round(_EXACT.add(_ZERO, total), places)  # as `total()` adds up: -0.00 becomes 0.00
    else:
        return None
    current = "created"
    previous = "created"
    settled = settled_rounded = _ZERO
    result: list[tuple[str, dict[str, Decimal]]] = []
    for event in events:
        event_type = event.get("type")
        if event_type == "settle":
            settled = _EXACT.add(settled, _number(event.get("net"), "settle net"))
            settled_rounded = _round(settled, places)
            previous = "settled"
        elif isinstance(event_type, str) and event_type != "fail" and movable:
            target = _CHANGES.get((current, event_type))
            if target is not None:
                current = previous = target
        # the two buckets in STATUS_ORDER (only `synchronized` comes after `settled`), when non-zero
        statuses: dict[str, Decimal] = {}
        if current == "synchronized" and settled_rounded:
            statuses["settled"] = settled_rounded
        if amount:
            statuses[current] = amount
        if settled_rounded and current != "synchronized":
            statuses["settled"] = settled_rounded
        result.append((previous, statuses))
    return result, amount


_NUMBER_TYPES = frozenset({int, float, type(None)})
_LABEL_TYPES = frozenset({str, type(None)})
_LINE_CACHE: dict[tuple[object, ...], tuple[int, Decimal]] = {}
_LINE_CACHE_SIZE = 4096


def _cached_line(item: object) -> tuple[int, Decimal] | None:
    """A line's units and amount (`_line(item)`'s quantity, and unit amount times quantity), remembered
    by its price, rebate, vat and quantity (shops sell the same lines again and again); None when the
    item is not a plain line (the general model then decides).

    Number, name and unit only tell lines apart, which whole-order events never need: as strings (or
    absent) they cannot make `_line` fail, so only their types are part of the key; a line with any
    other label is read by `_line` every time.
    """
    if type(item) is not dict:
        if not is_number(item):
            return None
        item = {"price": item}
    price, rebate, vat, quantity = (
        item.get("price"),
        item.get("rebate"),
        item.get("vat"),
        item.get("quantity"),
    )
    # the amounts, their types (1 and 1.0 stay apart, as their decimals do), and the labels' types
    key = (
        price, rebate, vat, quantity, type(price), type(rebate), type(vat), type(quantity),
        type(item.get("number")), type(item.get("name")), type(item.get("unit")),
    )  # fmt: skip
    try:
        line = _LINE_CACHE.get(key)
    except TypeError:  # a field that cannot be hashed: not a plain line
        return None
    if line is not None:
        return line  # plain and without a zero, or it would not have been stored
    if not _NUMBER_TYPES.issuperset(key[4:8]) or 0.0 in key[:4]:
        return None  # not plain; or a zero, where 0.0 and -0.0 are equal keys for different decimals
    try:
        with localcontext(_EXACT):
            parsed = _line(item, "items")
            line = (parsed.quantity, parsed.unit_amount * parsed.quantity)
    except (StatusError, DecimalException):
        return None
    if _LABEL_TYPES.issuperset(key[8:]):
        if len(_LINE_CACHE) >= _LINE_CACHE_SIZE:
            _LINE_CACHE.clear()
        _LINE_CACHE[key] = line
    return line


def _events(value: object) -> list[Mapping[str, Any]]:
    if value is None:
        return []
    if not _is_list(value):
        raise StatusError("the order's event is not a list")
    if len(value) > MAX_EVENTS:
        raise StatusError(f"the order has {len(value)} events, more than {MAX_EVENTS}")
    if not all(isinstance(event, Mapping) for event in value):
        raise StatusError("an event is not an object")
    lines = sum(len(items) for event in value if _is_list(items := event.get("items")))
    if lines > MAX_EVENT_LINES:
        raise StatusError(f"the order's events list {lines} item lines, more than {MAX_EVENT_LINES}")
    return list(value)


@dataclass(frozen=True)
class _Line:
    """One item line: what identifies it to an event, how many units it has and what each is worth."""

    key: tuple[object, ...]
    quantity: int
    unit_amount: Decimal


_KEY_FIELDS = ("number", "name", "price", "unit", "vat", "rebate")


def _lines(value: object, what: str) -> list[_Line]:
    """The lines of an Item, an Item[], or a number standing for the line `{price: n}`."""
    if is_number(value):
        value = {"price": value}
    if isinstance(value, Mapping):
        return [_line(value, what)]
    if _is_list(value):
        if len(value) > MAX_UNITS:
            raise StatusError(f"{what} has {len(value)} lines, more than {MAX_UNITS}")
        return [
            _line({"price": item} if is_number(item) else item, f"{what}[{i}]")
            for i, item in enumerate(value)
        ]
    raise StatusError(f"{what} is neither a number, an item nor a list of items")


def _line(item: object, what: str) -> _Line:
    if not isinstance(item, Mapping):
        raise StatusError(f"{what} is not an item")
    price = _number(item.get("price"), f"{what} price")
    unit_amount = (
        price
        - _optional_number(item.get("rebate"), f"{what} rebate")
        + _optional_number(item.get("vat"), f"{what} vat")
    )
    if unit_amount < 0:
        raise StatusError(f"{what} is worth {unit_amount} per unit, less than nothing")
    return _Line(
        key=tuple(_key_field(item.get(name), f"{what} {name}") for name in _KEY_FIELDS),
        quantity=_quantity(item.get("quantity"), f"{what} quantity"),
        unit_amount=unit_amount,
    )


def _key_field(value: object, what: str) -> object:
    """A field as lines are compared: absent and null alike, numbers by value (1 == 1.0)."""
    if value is None or isinstance(value, str):
        return value
    if is_number(value):
        return _number(value, what)
    raise StatusError(f"{what} is neither a string nor a number")


def _quantity(value: object, what: str) -> int:
    if value is None:
        return 1
    quantity = _number(value, what)
    if quantity < 0 or quantity != quantity.to_integral_value():
        raise StatusError(f"{what} {value!r} is not a whole number of units")
    return int(quantity)


class _Buckets(Protocol):
    """Where the order's amount stands, status by status, as events are applied."""

    def apply(self, event_type: str, event_items: object) -> str | None:
        """Apply one event that may move units; the status it moved them to, or None when none could take it."""

    def exact(self) -> dict[str, Decimal]:
        """The amount per status, exact (not yet rounded to the currency's minor unit)."""

    def total(self) -> Decimal:
        """The order's amount, exact."""


class _AmountBuckets:
    """`items` is a number: each event moves (part of) the first bucket that can take it."""

    def __init__(self, amount: Decimal, places: int) -> None:
        self._amounts = {"created": amount}
        self._places = places

    def apply(self, event_type: str, event_items: object) -> str | None:
        wanted = self._event_amount(event_items)
        for status in STATUS_ORDER:
            target = change(status, event_type)
            held = self._amounts.get(status, Decimal(0))
            if target is not None and (held >= wanted if wanted else held > 0):
                moved = wanted or held
                self._amounts[status] = held - moved
                self._amounts[target] = self._amounts.get(target, Decimal(0)) + moved
                return target
        return None

    def _event_amount(self, event_items: object) -> Decimal | None:
        """What the event covers; None (or zero, as in Intergiro's model) means a whole bucket."""
        if event_items is None:
            return None
        if is_number(event_items):
            return _amount(event_items, "event items", self._places)
        lines = _lines(event_items, "event items")
        return _round(sum((line.unit_amount * line.quantity for line in lines), Decimal(0)), self._places)

    def exact(self) -> dict[str, Decimal]:
        return dict(self._amounts)

    def total(self) -> Decimal:
        return sum(self._amounts.values(), Decimal(0))


class _UnitBuckets:
    """`items` is an Item or Item[]: every unit has its own status.

    Lines equal for events (same number, name, price, unit, vat, rebate) share one group whose units
    are the lines' units in order, so "first units first" holds across them. A group keeps its units as
    runs of (label, count), and each label stands for a status through `_LabelTable`: an event without
    items then relabels at most eleven statuses instead of visiting every line, so the work per event
    stays small however many units the order has.
    """

    def __init__(self, lines: list[_Line]) -> None:
        units = sum(line.quantity for line in lines)
        if units > MAX_UNITS:
            raise StatusError(f"the order has {units} units, more than {MAX_UNITS}")
        self._labels = _LabelTable()
        created = self._labels.label("created")
        self._runs: dict[tuple[object, ...], list[tuple[int, int]]] = {}
        self._unit_amounts: dict[tuple[object, ...], Decimal] = {}
        for line in lines:
            self._unit_amounts[line.key] = line.unit_amount
            if line.quantity:
                _append_run(self._runs.setdefault(line.key, []), created, line.quantity)
        self._units = {"created": units}
        self._amounts = {"created": sum((line.unit_amount * line.quantity for line in lines), Decimal(0))}

    def apply(self, event_type: str, event_items: object) -> str | None:
        if event_items is None:
            return self._apply_to_every_unit(event_type)
        target = None
        for offer in _lines(event_items, "event items"):
            for status, count in self._take(offer.key, event_type, offer.quantity):
                target = self._move(status, event_type, count, self._unit_amounts[offer.key] * count)
        return target

    def _apply_to_every_unit(self, event_type: str) -> str | None:
        target = None
        for status in STATUS_ORDER:
            if self._units.get(status) and change(status, event_type) is not None:
                target = self._move(status, event_type, self._units[status], self._amounts[status])
                self._labels.relabel(status, target)
        return target

    def _move(self, status: str, event_type: str, units: int, amount: Decimal) -> str:
        target = change(status, event_type)
        assert target is not None
        self._units[status] -= units
        self._units[target] = self._units.get(target, 0) + units
        self._amounts[status] -= amount
        self._amounts[target] = self._amounts.get(target, Decimal(0)) + amount
        return target

    def _take(self, key: tuple[object, ...], event_type: str, quantity: int) -> list[tuple[str, int]]:
        """Relabel the group's first `quantity` units that can take the event; (status, count) they left."""
        runs = self._runs.get(key)
        if not runs or not quantity:
            return []
        moved: list[tuple[str, int]] = []
        after: list[tuple[int, int]] = []
        for index, (label, count) in enumerate(runs):
            if not quantity:
                after.extend(runs[index:])
                break
            status = self._labels.status(label)
            target = change(status, event_type)
            if target is None:
                _append_run(after, label, count)
                continue
            taken = min(count, quantity)
            quantity -= taken
            moved.append((status, taken))
            _append_run(after, self._labels.label(target), taken)
            if count > taken:
                _append_run(after, label, count - taken)
        self._runs[key] = after
        return moved

    def exact(self) -> dict[str, Decimal]:
        return dict(self._amounts)

    def total(self) -> Decimal:
        return sum(self._amounts.values(), Decimal(0))


class _LabelTable:
    """Labels for unit statuses, so that every unit in one status can change status in one step.

    Each status has at most one live label; relabelling a status to one that already has a label
    merges the two (union-find), so a run's label always leads to its units' current status.
    """

    def __init__(self) -> None:
        self._parent: list[int] = []
        self._status: list[str] = []
        self._label_of: dict[str, int] = {}

    def label(self, status: str) -> int:
        """The live label of `status`, made when it has none."""
        if status not in self._label_of:
            self._label_of[status] = len(self._parent)
            self._parent.append(len(self._parent))
            self._status.append(status)
        return self._label_of[status]

    def status(self, label: int) -> str:
        return self._status[self._root(label)]

    def relabel(self, status: str, target: str) -> None:
        """Every unit now in `status` is in `target`."""
        if status == target or status not in self._label_of:
            return
        label = self._label_of.pop(status)
        if target in self._label_of:
            self._parent[label] = self._label_of[target]
        else:
            self._label_of[target] = label
            self._status[label] = target

    def _root(self, label: int) -> int:
        root = label
        while self._parent[root] != root:
            root = self._parent[root]
        while self._parent[label] != root:  # path compression keeps later look-ups short
            self._parent[label], label = root, self._parent[label]
        return root


def _append_run(runs: list[tuple[int, int]], label: int, count: int) -> None:
    if runs and runs[-1][0] == label:
        runs[-1] = (label, runs[-1][1] + count)
    else:
        runs.append((label, count))


def _round_to_total(exact: Mapping[str, Decimal], places: int) -> dict[str, Decimal]:
    """The non-zero buckets rounded to the minor unit so that they still add up to the rounded total.

    Rounding each bucket alone could lose or gain a cent against the order amount when unit prices
    carry more decimals than the currency; the minor units left over go to the largest remainders.
    """
    total = int(sum(exact.values(), Decimal(0)).scaleb(places).to_integral_value(ROUND_HALF_EVEN, _ROUNDING))
    scaled = {status: exact[status].scaleb(places) for status in STATUS_ORDER if status in exact}
    minor = {status: int(value.to_integral_value(ROUND_FLOOR, _ROUNDING)) for status, value in scaled.items()}
    left_over = total - sum(minor.values())
    for status in sorted(scaled, key=lambda s: scaled[s] - minor[s], reverse=True)[:left_over]:
        minor[status] += 1
    return {status: Decimal(count).scaleb(-places) for status, count in minor.items() if count}


def _is_list(value: object) -> TypeGuard[Sequence[Any]]:
    return isinstance(value, Sequence) and not isinstance(value, (str, bytes, bytearray))


def _number(value: object, what: str) -> Decimal:
    """A JSON number as the decimal it was written as (0.1 stays 0.1, never 0.1000000000000000055...)."""
    if not is_number(value):
        raise StatusError(f"{what} is not a number: {value!r}")
    return Decimal(str(value))


def _optional_number(value: object, what: str) -> Decimal:
    return Decimal(0) if value is None else _number(value, what)


def _amount(value: object, what: str, places: int) -> Decimal:
    amount = _round(_number(value, what), places)
    if amount < 0:
        raise StatusError(f"{what} {value!r} is negative")
    return amount


def _round(value: Decimal, places: int) -> Decimal:
    return value.quantize(_QUANTA[places], ROUND_HALF_EVEN, _ROUNDING)

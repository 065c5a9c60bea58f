"""An order's status after each of its events, computed as Intergiro's own model does.

Pure: the decoded order JSON in, `Decimal` amounts per status out. The rules are in
`tests/data/intergiro/status-rules.md` (Intergiro's own, as the team gathered them): every unit starts
at `created` and the events are applied in list order; the status the callback itself carries is ignored.

The `created` bucket is listed like any other: present when non-zero, absent when zero.

One history loop applies the events to the order's buckets, which are kept as the events need them
(`_buckets`): in one piece when no event lists items (the common callback: each event then offers every
unit, so all units share one status), by amount when `items` is a number, and unit by unit otherwise.
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

from receiver.errors import IntergiroReceiverError

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


class StatusError(IntergiroReceiverError, ValueError):
    """The order's statuses cannot be computed: malformed amounts or quantities, or too much work."""


# (status, event type) -> the status a unit in that status moves to on that event
_CHANGES: dict[tuple[str, str], str] = {
    (status, event_type): target for event_type, (sources, target) in _MOVES.items() for status in sources
} | {(status, "synchronize"): "synchronized" for status in STATUS_ORDER}


def change(status: str, event_type: str) -> str | None:
    """The status a unit in `status` moves to on `event_type`, or None when it cannot take it."""
    return _CHANGES.get((status, event_type))


def status_history(order: Mapping[str, Any]) -> list[tuple[str, dict[str, Decimal]]]:
    """For each event of order["event"] in list order: (the update's status, the status map right after that event).

    Raises StatusError for an order whose statuses cannot be computed.
    """
    return _guarded(_history, order)[0]


def order_amount(order: Mapping[str, Any]) -> Decimal:
    """The order's amount (its items' total) in the currency's minor unit; StatusError when it has none."""
    return _guarded(_amount_of, order)


def history_and_amount(order: Mapping[str, Any]) -> tuple[list[tuple[str, dict[str, Decimal]]], Decimal]:
    """`status_history(order)` and `order_amount(order)` together, computed once, as the receiver needs both."""
    return _guarded(_history, order)


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
        if type(order) is not dict and not isinstance(order, Mapping):
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


def _buckets(order: Mapping[str, Any], places: int, events: Sequence[Mapping[str, Any]]) -> "_Buckets":
    """The order's amount, all of it still `created`, kept as `events` need it: in one piece when none
    of them lists items (each then offers every unit, or the whole amount), else by amount or by unit."""
    items = order.get("items")
    whole = True
    for event in events:
        if event.get("items") is not None:
            whole = False
            break
    if type(items) is not list and is_number(items):
        amount = _amount(items, "items", places)
        return _WholeOrder(amount, places, movable=amount > 0) if whole else _AmountBuckets(amount, places)
    lines = _lines(items, "items")
    units = 0
    total = _ZERO
    for line in lines:
        units += line.quantity
        total += line.unit_amount * line.quantity
    if units > MAX_UNITS:
        raise StatusError(f"the order has {units} units, more than {MAX_UNITS}")
    return (
        _WholeOrder(total, places, movable=units > 0) if whole else _UnitBuckets(lines, units, total, places)
    )


def _amount_of(order: Mapping[str, Any]) -> Decimal:
    return _buckets(order, _places(order), ()).amount()


def _history(order: Mapping[str, Any]) -> tuple[list[tuple[str, dict[str, Decimal]]], Decimal]:
    places = _places(order)
    events = _events(order.get("event"))
    buckets = _buckets(order, places, events)
    amount = buckets.amount()
    result: list[tuple[str, dict[str, Decimal]]] = []
    previous = "created"
    settled = settled_rounded = _ZERO
    for event in events:
        event_type = event.get("type")
        if event_type == "settle":
            settled += _number(event.get("net"), "settle net")
            settled_rounded = _round(settled, places)
            previous = "settled"
        elif isinstance(event_type, str) and event_type != "fail":
            previous = buckets.apply(event_type, event.get("items")) or previous
        statuses = buckets.rounded()
        if settled_rounded:
            statuses = _with_settled(statuses, settled_rounded)
        result.append((previous, statuses))
    return result, amount


def _with_settled(statuses: dict[str, Decimal], settled: Decimal) -> dict[str, Decimal]:
    """`statuses` (in STATUS_ORDER) with `settled` in its place: last but `synchronized`."""
    synchronized = statuses.pop("synchronized", None)
    statuses["settled"] = settled
    if synchronized is not None:
        statuses["synchronized"] = synchronized
    return statuses


def _events(value: object) -> Sequence[Mapping[str, Any]]:
    if value is None:
        return ()
    if not _is_list(value):
        raise StatusError("the order's event is not a list")
    if len(value) > MAX_EVENTS:
        raise StatusError(f"the order has {len(value)} events, more than {MAX_EVENTS}")
    lines = 0
    for event in value:
        if type(event) is not dict and not isinstance(event, Mapping):
            raise StatusError("an event is not an object")
        items = event.get("items")
        if items is not None and _is_list(items):
            lines += len(items)
    if lines > MAX_EVENT_LINES:
        raise StatusError(f"the order's events list {lines} item lines, more than {MAX_EVENT_LINES}")
    return value


@dataclass(frozen=True)
class _Line:
    """One item line: what identifies it to an event, how many units it has and what each is worth."""

    key: tuple[object, ...]
    quantity: int
    unit_amount: Decimal


_KEY_FIELDS = ("number", "name", "price", "unit", "vat", "rebate")


def _lines(value: object, what: str) -> list[_Line]:
    """The lines of an Item, an Item[], or a number standing for the line `{price: n}`."""
    if type(value) is not list:  # the usual shape first: the checks below cost more than the lines
        if is_number(value):
            value = {"price": value}
        if isinstance(value, Mapping):
            return [_remembered_line(value, what)]
        if not _is_list(value):
            raise StatusError(f"{what} is neither a number, an item nor a list of items")
    if len(value) > MAX_UNITS:
        raise StatusError(f"{what} has {len(value)} lines, more than {MAX_UNITS}")
    return [_remembered_line(item, what, index) for index, item in enumerate(value)]


_AMOUNT_TYPES = frozenset({int, float, type(None)})
_NONE_TYPE = type(None)
_LABEL_LENGTH = 64
_LINE_CACHE: dict[tuple[object, ...], _Line] = {}
_LINE_CACHE_SIZE = 4096


def _remembered_line(item: object, what: str, index: int = -1) -> _Line:
    """`_line` of the item (`what`, or its `index` in `what`), remembered when it is a plain line: shops
    sell the same lines again and again, and reading one is most of the model's work on a small order.

    The key is all that `_line` reads, the amounts' types included (1 and 1.0 are different decimals).
    """
    key: tuple[object, ...] | None
    if type(item) is dict:
        price, rebate, vat, quantity = (
            item.get("price"),
            item.get("rebate"),
            item.get("vat"),
            item.get("quantity"),
        )
        key = (
            price, rebate, vat, quantity, type(price), type(rebate), type(vat), type(quantity),
            item.get("number"), item.get("name"), item.get("unit"),
        )  # fmt: skip
    elif type(item) is int or type(item) is float:
        key = (item, None, None, None, type(item), _NONE_TYPE, _NONE_TYPE, _NONE_TYPE, None, None, None)
    else:
        key = None
    try:
        line = _LINE_CACHE.get(key) if key is not None else None
    except TypeError:  # a label that cannot be hashed: no plain line
        key = line = None
    if line is not None:
        return line  # only plain lines are stored, and no other key equals one of theirs
    line = _line({"price": item} if is_number(item) else item, what if index < 0 else f"{what}[{index}]")
    if key is not None and _plain(key):
        if len(_LINE_CACHE) >= _LINE_CACHE_SIZE:
            _LINE_CACHE.clear()
        _LINE_CACHE[key] = line
    return line


def _plain(key: tuple[object, ...]) -> bool:
    """Whether a line's key may be remembered: amounts that are ints, floats or absent, and none of them
    zero (0.0 and -0.0 are equal keys for different decimals); labels that are short strings or absent
    (so that the cache stays small)."""
    return (
        _AMOUNT_TYPES.issuperset(key[4:8])
        and 0.0 not in key[:4]
        and all(label is None or (type(label) is str and len(label) <= _LABEL_LENGTH) for label in key[8:])
    )


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

    def rounded(self) -> dict[str, Decimal]:
        """The non-zero amounts per status in STATUS_ORDER, rounded to the currency's minor unit so that
        they add up to `amount()`."""

    def amount(self) -> Decimal:
        """The order's amount, rounded to the currency's minor unit."""


class _WholeOrder:
    """No event lists items: each offers every unit (or the whole amount), so all of the order's units
    are in one status at any time, holding the whole amount, and no unit needs its own status.

    Rounding that one bucket to the total is rounding the total.
    """

    def __init__(self, total: Decimal, places: int, *, movable: bool) -> None:
        self._status = "created"
        # 0 + total, as the other buckets add up (-0.00 becomes 0.00)
        self._amount = _round(_ZERO + total, places)
        self._movable = movable  # an order of no units, or an amount of nothing, takes no event

    def apply(self, event_type: str, event_items: object) -> str | None:
        target = _CHANGES.get((self._status, event_type)) if self._movable else None
        if target is not None:
            self._status = target
        return target

    def rounded(self) -> dict[str, Decimal]:
        return {self._status: self._amount} if self._amount else {}

    def amount(self) -> Decimal:
        return self._amount


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

    def rounded(self) -> dict[str, Decimal]:
        return _round_to_total(self._amounts, self._places)

    def amount(self) -> Decimal:
        return _round(sum(self._amounts.values(), Decimal(0)), self._places)


class _UnitBuckets:
    """`items` is an Item or Item[]: every unit has its own status.

    Lines equal for events (same number, name, price, unit, vat, rebate) share one group whose units
    are the lines' units in order, so "first units first" holds across them. A group keeps its units as
    runs of (label, count), and each label stands for a status through `_LabelTable`: an event without
    items then relabels at most eleven statuses instead of visiting every line, so the work per event
    stays small however many units the order has.
    """

    def __init__(self, lines: list[_Line], units: int, total: Decimal, places: int) -> None:
        """`lines` hold `units` units worth `total` in all."""
        self._places = places
        self._labels = _LabelTable()
        created = self._labels.label("created")
        self._runs: dict[tuple[object, ...], list[tuple[int, int]]] = {}
        self._unit_amounts: dict[tuple[object, ...], Decimal] = {}
        for line in lines:
            self._unit_amounts[line.key] = line.unit_amount
            if line.quantity:
                _append_run(self._runs.setdefault(line.key, []), created, line.quantity)
        self._units = {"created": units}
        self._amounts = {"created": total}

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

    def rounded(self) -> dict[str, Decimal]:
        return _round_to_total(self._amounts, self._places)

    def amount(self) -> Decimal:
        return _round(sum(self._amounts.values(), Decimal(0)), self._places)


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
    return type(value) is list or (
        isinstance(value, Sequence) and not isinstance(value, (str, bytes, bytearray))
    )


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

"""Normalization: the updates a callback turns into, whatever order its events arrive in."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bench.tokens import bench_order
from receiver import order as receiver_order
from receiver.errors import BadCallback
from receiver.order import EVENT_FIELDS, EVENT_TYPES, PAYMENT_FIELDS, build_updates, parse_order, snake
from tests import reference_order
from tests.helpers import assert_valid_update
from tests.test_status import REAL_ORDERS, orders


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


# --- the receiver's normalization is exactly the plain reference's ---------------------------------------


def outcome(normalize: Any, order: Any) -> str:
    """What a normalization gives, spelled so that 1 and 1.0, key order and reasons all count."""
    try:
        parsed = normalize.parse_order(order)
        assert parsed is order
        return repr(normalize.build_updates(parsed, received_at="2026-11-23T00:00:00Z", verified_by="remote"))
    except BadCallback as error:
        return f"BadCallback({error.reason!r})"


def mostly(usual: st.SearchStrategy[Any], odd: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """`usual` nine times in ten, so that most orders get past parsing; else `odd`."""
    return st.integers(0, 9).flatmap(lambda n: odd if n == 5 else usual)  # hypothesis favours 0 and 9


def spellings(*names: str) -> st.SearchStrategy[str]:
    """Each name as written, and as camelCase, snake_case and shouting clients might write it."""
    variants = {n for name in names for n in (name, name.upper(), name.capitalize(), snake(name))}
    return st.sampled_from(sorted(variants))


scalars = st.none() | st.booleans() | st.integers(-(10**15), 10**15) | st.floats() | st.text(max_size=6)
nested_keys = spellings("zipCode", "countryCode", "identityNumber", "first", "a1B", "URLPath") | st.text(
    max_size=5
)
json_values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(nested_keys, inner, max_size=3),
    max_leaves=10,
)
numbers = mostly(
    st.integers(0, 500) | st.decimals(min_value=0, max_value=1000, places=2).map(float),
    st.sampled_from([0.0, -0.0, 0.005, 1e-7, 123.456, -1, True, 1e13, 10**20, float("nan")]),
)
items_fields = {"quantity": mostly(st.integers(0, 4), numbers), "vat": numbers, "rebate": numbers}
item_strings = {name: mostly(st.sampled_from(["mug", "cup"]), scalars) for name in ("number", "name", "unit")}
order_items = st.fixed_dictionaries({"price": numbers}, optional={**items_fields, **item_strings})
items = mostly(numbers | order_items | st.lists(mostly(order_items, numbers), max_size=4), scalars)
objects = st.dictionaries(nested_keys, json_values, min_size=1, max_size=3)
# A carried field's value, of the kind the update schema promises for it (mostly).
of_kind = {
    "string": st.text(max_size=4),
    "array": st.lists(st.integers(0, 99) | objects, max_size=2),
    "object": objects,
    "number": numbers,
    "any": json_values | objects,
}
payment_keys = spellings("type", "service", "status", "scheme", "iin", "last4", "expires", "reference")
payment_keys |= spellings("method", "card", "amount", "currency", "schemeReference", "cardType")
event_keys = spellings("reference", "original", "error", "descriptor", "period", "payout", "gross", "fee")
event_keys |= spellings("net", "currency", "payoutReference", "items", "status")
event_types = mostly(st.sampled_from(sorted(EVENT_TYPES)), st.sampled_from(["created", "authorize", 7]))


@st.composite
def mixed(
    draw: st.DrawFn, required: dict[str, Any], keys: st.SearchStrategy[str], fields: dict[str, str]
) -> dict[str, Any]:
    """`required` with other fields before or after it, under any of their spellings."""
    others = {}
    for key in draw(st.lists(keys, max_size=6)):
        kind = fields.get(snake(key))
        others[key] = draw(mostly(of_kind[kind], json_values) if kind else json_values | objects)
    return {**others, **required} if draw(st.booleans()) else {**required, **others}


@st.composite
def callbacks(draw: st.DrawFn) -> dict[str, Any]:
    """Orders as Intergiro might write them: either key style or both, every shape of items, odd values."""
    events = []
    for event_type in draw(st.lists(event_types, max_size=5)):
        event: dict[str, Any] = {
            "type": event_type,
            "date": draw(mostly(st.just("2026-11-23T00:00:01Z"), scalars)),
        }
        if draw(st.booleans()):
            event["items"] = draw(items)
        if event_type == "settle" and draw(st.booleans()):
            event["net"] = draw(numbers)
        events.append(draw(mixed(event, event_keys, EVENT_FIELDS)))
    payment = draw(mixed({"type": draw(mostly(st.just("card"), scalars))}, payment_keys, PAYMENT_FIELDS))
    order: dict[str, Any] = {
        "id": draw(mostly(st.just("Order0001"), st.sampled_from(["x" * 65, "bad id", 7]))),
        "currency": draw(mostly(st.sampled_from(["SEK", "JPY", "KWD", "EUR"]), st.just("sek"))),
        "items": draw(items),
        "payment": payment,
    }
    optional = {
        "event": mostly(st.just(events), st.none()),
        "number": mostly(st.text(max_size=4), scalars),
        "created": mostly(st.just("2026-11-23T00:00:00Z"), scalars),
        "client": mostly(st.text(max_size=4), scalars),
        "category": mostly(st.sampled_from(["purchase", "withdrawal"]), st.just("other")),
        "customer": mostly(
            st.dictionaries(nested_keys, json_values, max_size=4), st.text(max_size=4) | scalars
        ),
        "meta": json_values,
    }
    for name, values in optional.items():
        if draw(st.booleans()):
            order[name] = draw(values)
    return order


@settings(max_examples=500, deadline=None)
@given(callbacks())
def test_updates_are_exactly_the_plain_reference_normalizations(order: dict[str, Any]) -> None:
    assert outcome(receiver_order, order) == outcome(reference_order, order)


@pytest.mark.parametrize("order", REAL_ORDERS, ids=[order["id"] for order in REAL_ORDERS])
def test_real_callbacks_give_exactly_the_plain_reference_updates(order: dict[str, Any]) -> None:
    assert outcome(receiver_order, order) == outcome(reference_order, order)


def test_bench_orders_give_exactly_the_plain_reference_updates() -> None:
    for index in range(20):
        order = json.loads(json.dumps(bench_order(index)))
        assert outcome(receiver_order, order) == outcome(reference_order, order)


def nested_in(depth: int, leaf: Any, shapes: list[str]) -> Any:
    value = leaf
    for level in range(depth):
        shape = shapes[level % len(shapes)]
        value = {"a": value, "b": 1} if shape == "object" else [1, value] if shape == "list" else (value,)
    return value


odd_scalars = st.sampled_from([10**30, -(2**64), float("nan"), "x\n" + " " * 80, True, None])
nestable = st.recursive(
    scalars | odd_scalars,
    lambda inner: (
        st.lists(inner, max_size=3)
        | st.lists(inner, max_size=2).map(tuple)
        | st.dictionaries(st.text(max_size=3) | st.integers(0, 3), inner, max_size=3)
    ),
    max_leaves=12,
)


@settings(max_examples=500, deadline=None)
@given(nestable, st.integers(1, 6))
def test_the_depth_check_is_the_plain_level_by_level_walk(value: Any, limit: int) -> None:
    assert receiver_order._nested_within(value, limit) == reference_order._nested_within(value, limit)


@settings(max_examples=200, deadline=None)
@given(
    st.integers(receiver_order.MAX_DEPTH - 2, receiver_order.MAX_DEPTH + 2),
    st.sampled_from([1, "x", {}, [], (), {"a": []}, 10**30]),
    st.lists(st.sampled_from(["object", "list", "tuple"]), min_size=1, max_size=3),
)
def test_orders_around_the_depth_limit_are_judged_as_by_the_plain_walk(
    depth: int, leaf: Any, shapes: list[str]
) -> None:
    order = {"meta": nested_in(depth, leaf, shapes)}
    limit = receiver_order.MAX_DEPTH
    assert receiver_order._nested_within(order, limit) == reference_order._nested_within(order, limit)

"""Small builders shared by the tests: orders and signed tokens."""

from __future__ import annotations

import json
from importlib import resources
from typing import Any

import jsonschema

from receiver.tools.send import sign_order

UPDATE_SCHEMA = json.loads(resources.files("receiver").joinpath("update-v1.schema.json").read_text())
_validator = jsonschema.Draft202012Validator(UPDATE_SCHEMA, format_checker=jsonschema.FormatChecker())


def assert_valid_update(update: dict[str, Any]) -> None:
    _validator.validate(update)


def card_order(
    order_id: str = "TestOrder0000001", events: tuple[str, ...] = ("order",), **extra: Any
) -> dict[str, Any]:
    """A card order in the shape of Intergiro's real 2020 callbacks (camelCase)."""
    return {
        "id": order_id,
        "number": f"n-{order_id}",
        "created": "2020-09-03T11:26:20.000Z",
        "items": [
            {"number": "ts001-b", "name": "Basic T-shirt", "price": 119.6, "vat": 29.9, "quantity": 2},
            {"number": "ts001-w", "name": "White T-shirt", "price": 119.6, "vat": 29.9},
        ],
        "currency": "SEK",
        "payment": {
            "type": "card",
            "service": "cardfunc",
            "status": "created",
            "scheme": "visa",
            "iin": "411111",
            "last4": "1111",
            "expires": [2, 22],
            "reference": "ref-1",
            "amount": 448.5,
            "currency": "SEK",
            "card": "eyJhbGciOiJSUzI1NiJ9.c2VjcmV0LWNhcmQtdG9rZW4.c2ln",
        },
        "event": [{"type": t, "date": f"2020-09-03T11:26:2{i}.000Z"} for i, t in enumerate(events)],
        **extra,
    }


def token(order: dict[str, Any], key: Any, audience: str = "production", **kw: Any) -> bytes:
    return sign_order(order, key, audience, **kw).encode()


JWT = {"Content-Type": "application/jwt; charset=utf-8"}
JSON = {"Content-Type": "application/json; charset=utf-8"}

"""`intergiro-receiver send`: sign an order exactly as Intergiro does and POST it, to try a deployment."""

from __future__ import annotations

import argparse
import json
import secrets
import string
import time
import urllib.error
import urllib.request
from datetime import UTC, datetime
from importlib import resources
from pathlib import Path
from typing import Any

import jwt
from cryptography.hazmat.primitives import serialization

from receiver.errors import report
from receiver.settings import read_environment

DEV_KEY_PATH = Path(".dev") / "signing-key.pem"
DEV_AUDIENCE = "development"
_ID_ALPHABET = string.ascii_letters + string.digits


def sign_order(
    order: dict[str, Any],
    private_key: Any,
    audience: str,
    *,
    iat: int | None = None,
    algorithm: str = "RS256",
    headers: dict[str, Any] | None = None,
) -> str:
    """A callback token as Intergiro makes it: order fields at the top level, `iss` payfunc, `aud`,
    and `iat` in milliseconds (as real tokens carry it) unless given."""
    claims = {
        "iss": "payfunc",
        "iat": int(time.time() * 1000) if iat is None else iat,
        "aud": audience,
        **order,
    }
    return jwt.encode(claims, private_key, algorithm=algorithm, headers=headers)


def load_private_key(path: Path) -> Any:
    return serialization.load_pem_private_key(path.read_bytes(), password=None)


def sample_names() -> list[str]:
    """The sample orders shipped in `receiver/samples/`, by name (`card-ordered`, ...)."""
    folder = resources.files("receiver").joinpath("samples")
    return sorted(p.name.removesuffix(".json") for p in folder.iterdir() if p.name.endswith(".json"))


def read_order(name_or_path: str) -> dict[str, Any]:
    """An order from a JSON file, or a shipped sample by name; raises ValueError saying which exist."""
    path = Path(name_or_path)
    if path.is_file():
        text = path.read_text()
    elif name_or_path.removesuffix(".json") in sample_names():
        sample = f"{name_or_path.removesuffix('.json')}.json"
        text = resources.files("receiver").joinpath("samples", sample).read_text()
    else:
        raise ValueError(f"no file {name_or_path} and no such sample (samples: {', '.join(sample_names())})")
    order = json.loads(text)
    if not isinstance(order, dict):
        raise ValueError(f"{name_or_path} does not hold a JSON object")
    return order


def add_events(order: dict[str, Any], event_types: list[str]) -> dict[str, Any]:
    now = datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
    return {**order, "event": [*order.get("event", []), *({"type": t, "date": now} for t in event_types)]}


def new_order_id() -> str:
    """A fresh 16-character order id, as Intergiro's look."""
    return "".join(secrets.choice(_ID_ALPHABET) for _ in range(16))


def post_token(url: str, token: str) -> tuple[int, str]:
    """POST the token as Intergiro does; the answer's status and body."""
    request = urllib.request.Request(  # noqa: S310 - the user names the URL
        url,
        data=token.encode(),
        method="POST",
        headers={"Content-Type": "application/jwt; charset=utf-8"},
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as answer:  # noqa: S310
            return int(answer.status), answer.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def run_send(args: argparse.Namespace) -> int:
    try:
        order = read_order(args.order)
    except (ValueError, OSError) as exc:
        report("send", str(exc))
        return 2
    order = add_events(order, args.event)
    if args.new_id:
        order["id"] = new_order_id()
    key_path = Path(args.key) if args.key else DEV_KEY_PATH
    if not key_path.exists():
        report(
            "send", f"no signing key at {key_path} (run `intergiro-receiver dev` here first, or pass --key)"
        )
        return 2
    # The dev key is trusted for the development audience only; another key signs for the
    # environment this shell is configured for.
    environment = read_environment().get("INTERGIRO_ENVIRONMENT") or "production"
    audience = args.audience or (environment if args.key else DEV_AUDIENCE)
    iat = int(time.time()) if args.iat_seconds else None
    token = sign_order(order, load_private_key(key_path), audience, iat=iat)
    try:
        status, body = post_token(args.url, token)
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        report("send", f"cannot reach {args.url} ({reason})")
        return 1
    print(status, body)
    return 0 if status == 200 else 1

"""`intergiro-receiver send`: sign an order exactly as Intergiro does and POST it, to try a deployment."""

from __future__ import annotations

import argparse
import json
import sys
import time
import urllib.error
import urllib.request
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import jwt
from cryptography.hazmat.primitives import serialization

DEV_KEY_PATH = Path(".dev") / "signing-key.pem"


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


def add_events(order: dict[str, Any], event_types: list[str]) -> dict[str, Any]:
    now = datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
    return {**order, "event": [*order.get("event", []), *({"type": t, "date": now} for t in event_types)]}


def run_send(args: argparse.Namespace) -> int:
    order = json.loads(Path(args.order).read_text())
    order = add_events(order, args.event)
    key_path = Path(args.key) if args.key else DEV_KEY_PATH
    if not key_path.exists():
        print(
            f"send: no signing key at {key_path} (run `intergiro-receiver dev` or pass --key)",
            file=sys.stderr,
        )
        return 2
    audience = args.audience or ("development" if not args.key else "production")
    token = sign_order(order, load_private_key(key_path), audience)
    request = urllib.request.Request(  # noqa: S310 - the user names the URL
        args.url,
        data=token.encode(),
        method="POST",
        headers={"Content-Type": "application/jwt; charset=utf-8"},
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as answer:  # noqa: S310
            print(answer.status, answer.read().decode())
            return 0
    except urllib.error.HTTPError as exc:
        print(exc.code, exc.read().decode())
        return 1
    except urllib.error.URLError as exc:
        print(f"send: cannot reach {args.url} ({exc.reason})", file=sys.stderr)
        return 1

"""Is this callback really from Intergiro? Local RS256/ES256 verification, or Intergiro's verify endpoint.

Local verification checks the signature with PyJWT against keys from configuration only, with the
algorithm fixed by the key (so `none` and HMAC-with-a-public-key can never verify), then checks the
claims by hand: PyJWT's own `iat` check rejects Intergiro's millisecond `iat`.
"""

from __future__ import annotations

import binascii
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import aiohttp
import jwt
from jwt.exceptions import InvalidSignatureError, InvalidTokenError

from receiver.errors import BadCallback, NotTrusted, Unavailable
from receiver.keys import TrustedKey

ALLOWED_ALGORITHMS = frozenset({"RS256", "ES256"})
ISSUER = "payfunc"
# Header parameters that would let a token name its own key or demand processing we do not do.
FORBIDDEN_HEADERS = frozenset({"jku", "x5u", "jwk", "x5c", "crit"})
CLOCK_SKEW_SECONDS = 300
_jws = jwt.PyJWS()


@dataclass(frozen=True)
class Verified:
    """A trusted order and who vouched for it (`local:<key name>` or `remote`)."""

    order: dict[str, Any]
    verified_by: str


class DuplicateKey(ValueError):
    """JSON that names one key twice: two parsers could read two different values."""


def _reject_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise DuplicateKey(f"duplicate key {key!r}")
        result[key] = value
    return result


def strict_json(data: bytes | str) -> Any:
    """Parse JSON, refusing duplicate keys (two parsers could read two different orders)."""
    return json.loads(data, object_pairs_hook=_reject_duplicate_keys)


def _b64url_json(segment: bytes, what: str) -> dict[str, Any]:
    try:
        raw = jwt.utils.base64url_decode(segment)
        value = strict_json(raw)
    except DuplicateKey:
        # A header read one way by us and another by PyJWT (`alg` twice) is an attack, not a typo.
        raise NotTrusted(f"token {what} repeats a key") from None
    except (ValueError, binascii.Error, UnicodeDecodeError, RecursionError):
        raise BadCallback(f"token {what} is not base64url JSON") from None
    if not isinstance(value, dict):
        raise BadCallback(f"token {what} is not a JSON object")
    return value


def read_header(token: bytes) -> dict[str, Any]:
    """The JOSE header of a compact JWS; raises BadCallback when the body is not a JWT at all, and
    NotTrusted when it is a token but not one signed payload with one signature."""
    parts = token.split(b".")
    if len(parts) < 2 or not parts[0]:
        raise BadCallback("body is not a JWT (expected three dot-separated parts)")
    header = _b64url_json(parts[0], "header")
    if len(parts) != 3 or not parts[1]:
        raise NotTrusted("token is not one payload with one signature")
    return header


def check_header(header: dict[str, Any]) -> str:
    """The token's algorithm, when it is on the allowlist and the header names no key of its own."""
    alg = header.get("alg")
    if not isinstance(alg, str) or alg not in ALLOWED_ALGORITHMS:
        raise NotTrusted(f"algorithm {alg!r} is not accepted (RS256 or ES256 only)")
    named = FORBIDDEN_HEADERS.intersection(header)
    if named:
        raise NotTrusted(f"header parameter {sorted(named)[0]!r} is not accepted")
    return str(alg)


def check_claims(claims: dict[str, Any], audience: str, now: float | None = None) -> None:
    """Issuer, audience, and the time claims when present (`iat` in seconds or milliseconds)."""
    now = time.time() if now is None else now
    if claims.get("iss") != ISSUER:
        raise NotTrusted("issuer is not payfunc")
    aud = claims.get("aud")
    if not (aud == audience or (isinstance(aud, list) and audience in aud)):
        raise NotTrusted(f"audience is not {audience}")
    for name in ("iat", "nbf", "exp"):
        if name in claims:
            value = claims[name]
            # the range also refuses NaN, infinities and integers too large to divide into a float
            if isinstance(value, bool) or not isinstance(value, int | float) or not -1e18 < value < 1e18:
                raise NotTrusted(f"claim {name} is not a plausible time")
            if value > 1e12:  # Intergiro's tokens carry milliseconds
                value = value / 1000
            if name in ("iat", "nbf") and value > now + CLOCK_SKEW_SECONDS:
                raise NotTrusted(f"claim {name} is in the future")
            if name == "exp" and value <= now - CLOCK_SKEW_SECONDS:
                raise NotTrusted("token has expired")


class NoKeyVerifies(NotTrusted):
    """The signature matches none of the local keys: the one case that may fall back to remote."""


def verify_local(token: bytes, keys: Sequence[TrustedKey], audience: str) -> Verified:
    """Verify a compact JWS against the trusted keys; raises NotTrusted or BadCallback."""
    alg = check_header(read_header(token))
    candidates = [key for key in keys if key.algorithm == alg]
    for key in candidates:
        try:
            payload = _jws.decode(token, key.key, algorithms=[key.algorithm])
        except InvalidSignatureError:
            continue
        except InvalidTokenError:
            raise NotTrusted("token is malformed") from None
        try:
            claims = strict_json(payload)
        except (ValueError, UnicodeDecodeError, RecursionError):
            raise NotTrusted("token payload is not a JSON object (or repeats a key)") from None
        if not isinstance(claims, dict):
            raise NotTrusted("token payload is not a JSON object")
        check_claims(claims, audience)
        return Verified(order=claims, verified_by=f"local:{key.name}")
    raise NoKeyVerifies("no trusted key verifies the signature")


async def verify_remote(
    session: aiohttp.ClientSession,
    body: bytes,
    content_type: str,
    *,
    api_url: str,
    api_key: str,
    timeout_seconds: float,
) -> Verified:
    """Ask Intergiro's verify endpoint; its order JSON is what we trust and normalize."""
    url = f"{api_url}/v1/worker-order/order/verify"
    headers = {
        "Content-Type": content_type,
        "Accept": "application/json",
        "Authorization": f"Bearer {api_key}",
    }
    try:
        async with session.post(
            url, data=body, headers=headers, timeout=aiohttp.ClientTimeout(total=timeout_seconds)
        ) as answer:
            text = await answer.read()
            status = answer.status
    except (TimeoutError, aiohttp.ClientError, OSError):
        raise Unavailable("verify endpoint not reachable") from None
    if status >= 500 or status in (408, 429):
        raise Unavailable(f"verify endpoint answered {status}")
    if status >= 400:
        raise NotTrusted(f"verify endpoint refused the callback ({status})")
    if status != 200:
        raise Unavailable(f"verify endpoint answered {status}")
    try:
        order = strict_json(text)
    except (ValueError, UnicodeDecodeError, RecursionError):
        raise Unavailable("verify endpoint answered something that is not JSON") from None
    if not isinstance(order, dict):
        raise Unavailable("verify endpoint answered something that is not an order")
    return Verified(order=order, verified_by="remote")

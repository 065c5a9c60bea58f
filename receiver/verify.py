"""Is this callback really from Intergiro? Local RS256/ES256 verification (Intergiro's verify endpoint
is in `intergiro_api`).

Local verification checks the signature with `cryptography` directly, against key objects loaded once
from configuration, with the algorithm fixed by the key (so `none` and HMAC-with-a-public-key can never
verify), then checks the claims by hand (PyJWT's own `iat` check rejects Intergiro's millisecond `iat`).
It keeps PyJWT's checks of the compact form (strict, canonical base64url; `kid` a string; no
`b64: false`) without its per-character Python loops, which cost more than the RSA check itself.
"""

from __future__ import annotations

import base64
import binascii
import functools
import json
import math
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import orjson
import pybase64
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

from receiver.errors import BadCallback, IntergiroReceiverError, NotTrusted
from receiver.keys import TrustedKey

ALLOWED_ALGORITHMS = frozenset({"RS256", "ES256"})
ISSUER = "payfunc"
# Header parameters that would let a token name its own key or demand processing we do not do.
FORBIDDEN_HEADERS = frozenset({"jku", "x5u", "jwk", "x5c", "crit"})
CLOCK_SKEW_SECONDS = 300
_BASE64URL_ALPHABET = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
_PADDING = (b"", b"", b"==", b"=")  # by the number of characters in the last group
# The last character of a short last group also carries unused low bits, zero in the canonical form:
# four of them after two characters (one byte), two after three characters (two bytes).
_CANONICAL_LAST = {2: frozenset(_BASE64URL_ALPHABET[::16]), 3: frozenset(_BASE64URL_ALPHABET[::4])}
_PKCS1V15 = padding.PKCS1v15()
_SHA256 = hashes.SHA256()
_ECDSA_SHA256 = ec.ECDSA(hashes.SHA256())


@dataclass(frozen=True)
class Verified:
    """A trusted order and who vouched for it (`local:<key name>` or `remote`); `repaired`: the places
    of the order whose value no update could carry as sent (see `repair_unwritable`)."""

    order: dict[str, Any]
    verified_by: str
    repaired: tuple[str, ...] = ()


class DuplicateKey(IntergiroReceiverError, ValueError):
    """JSON that names one key twice: two parsers could read two different values."""


def _reject_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result = dict(pairs)  # in C; a shorter dict than list means a key came twice
    if len(result) != len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise DuplicateKey(f"duplicate key {key!r}")
            seen.add(key)
    return result


def strict_json(data: bytes | str, *, writable: bool = True) -> Any:
    """Parse JSON, refusing duplicate keys (two parsers could read two different orders) and, unless
    `writable` is false, values no update could carry (Unrepresentable, naming where; with `writable`
    false such numbers are left in the value as `_NotFinite` objects, for callers that check a part).

    orjson parses first (it is faster), and its value is taken only when it surely is the
    standard library's. That is so when orjson writes the text back byte for byte (as it does the
    compact JSON of PyJWT and of Intergiro): its output never repeats a key, its floats are the
    shortest spelling that reads back as the same float, and it writes at most 254 levels deep, far
    from the standard library's recursion limit. Otherwise, when no key was repeated (a repeated key
    drops a key and its value, so the compact re-serialization holds fewer colons than the text, where
    every colon is a key's or inside a string; a colon spelled `\\u003a` could hide that, so such text
    is left to the standard library) and the text held no integer beyond 64 bits (orjson reads one as
    a float of 1e16 or more, written back with `e+`, so any `e+` is sent to the standard library).
    Anything else goes to the standard library, which gives the answer or the error it always gave
    (UTF-16, repeated keys), and its value is then checked for what orjson cannot write: NaN and
    infinities (also `1e400`), lone surrogates, integers beyond 64 bits.
    """
    # `a not in x or b not in x` first looks for one byte (memchr), for the longer string only when
    # that byte is there.
    if isinstance(data, bytes) and (b"\\" not in data or b"\\u003" not in data):
        try:
            value = orjson.loads(data)
            compact = orjson.dumps(value)
        except (orjson.JSONDecodeError, orjson.JSONEncodeError):
            pass
        else:
            if compact == data or (
                compact.count(b":") == data.count(b":") and (b"+" not in compact or b"e+" not in compact)
            ):
                return value
    value = json.loads(
        data,
        object_pairs_hook=_reject_duplicate_keys,
        parse_constant=_not_json,
        parse_float=_finite_float,
        parse_int=_integer,
    )
    if writable:
        check_writable(value)
    return value


def check_writable(value: Any) -> None:
    """Raise Unrepresentable, naming the place, when orjson cannot write `value` (or any of it)."""
    try:
        orjson.dumps(value)
    except orjson.JSONEncodeError:
        raise Unrepresentable(_unrepresentable_place(value)) from None


class Unrepresentable(IntergiroReceiverError, ValueError):
    """JSON that parses but that no update could carry, naming where: a lone surrogate (what JavaScript
    writes for a string cut inside an emoji), an integer beyond 64 bits, a number that is not finite
    (`NaN`, `Infinity`, `1e400`), or nesting deeper than any update is written."""


class _NotFinite:
    """A number the standard library would read as NaN or an infinity, kept as its text until the
    place that holds it is named (orjson writes no object of this class). `json_number`: whether
    the text is a JSON number (`1e400`), not a literal JSON has no place for (`NaN`, `Infinity`)."""

    __slots__ = ("json_number", "text")

    def __init__(self, text: str, json_number: bool = True) -> None:
        self.text = text
        self.json_number = json_number


def _not_json(text: str) -> _NotFinite:
    return _NotFinite(text, json_number=False)


def _finite_float(text: str) -> float | _NotFinite:
    value = float(text)
    return value if math.isfinite(value) else _NotFinite(text)


# Python refuses to read an integer of more than 4,300 digits (CVE-2020-10735): such a number is
# kept as its text, which only `repair_unwritable` turns into a string.
_MAX_INT_DIGITS = 4300


def _integer(text: str) -> int | _BigInteger:
    return int(text) if len(text) <= _MAX_INT_DIGITS else _BigInteger(text)


class _BigInteger:
    """The text of an integer too long for `int` to read (far beyond 64 bits)."""

    __slots__ = ("text",)

    def __init__(self, text: str) -> None:
        self.text = text


_INT64_LOW, _UINT64_HIGH = -(2**63), 2**64 - 1
MAX_PLACE_CHARS = 200  # a place named in an answer or an update is cut to this
_WRITABLE_DEPTH = 254  # orjson's limit


def _problem(value: Any) -> str | None:
    """What makes a scalar unwritable, or None."""
    if isinstance(value, _NotFinite):
        return f"holds the number {value.text[:20]}, which is not finite"
    if isinstance(value, _BigInteger) or (
        isinstance(value, int) and not isinstance(value, bool) and not _INT64_LOW <= value <= _UINT64_HIGH
    ):
        return "holds an integer beyond 64 bits"
    if isinstance(value, str):
        try:
            value.encode()
        except UnicodeEncodeError:
            return "holds a lone surrogate (a string cut inside a character)"
    return None


def _unrepresentable_place(value: Any) -> str:
    """`<place> <problem>` for the first value (or key) orjson cannot write; walked without recursion."""
    stack: list[tuple[str, Any, int]] = [("", value, 0)]
    while stack:
        place, item, depth = stack.pop()
        if isinstance(item, dict | list) and depth >= _WRITABLE_DEPTH:
            return f"{place or 'the value'} is nested too deeply"
        if isinstance(item, dict):
            for key, child in reversed(item.items()):
                problem = _problem(key)
                if problem is not None:
                    return f"a key of {place or 'the object'} {problem}"
                stack.append((f"{place}.{key}" if place else str(key), child, depth + 1))
        elif isinstance(item, list):
            stack.extend((f"{place}[{i}]", child, depth + 1) for i, child in reversed(list(enumerate(item))))
        else:
            problem = _problem(item)
            if problem is not None:
                return f"{place or 'the value'} {problem}"
    return "the value cannot be written as JSON"


# What a trusted order's value that no update can carry becomes (`repair_unwritable`): a lone surrogate
# U+FFFD, the replacement character (the half of a character it is stands for nothing on its own); an
# integer beyond 64 bits or a JSON number beyond a double (`1e400`) the string of its digits, as sent.
REPLACEMENT_CHARACTER = "\ufffd"
MAX_REPAIRED_PLACES = 20
_SURROGATE = re.compile("[\ud800-\udfff]")


def _repaired_scalar(value: Any) -> Any:
    """The writable form of a scalar `_problem` finds fault with; Unrepresentable for what JSON has no
    place for (`NaN`, `Infinity`), which no signer of JSON writes."""
    if isinstance(value, str):
        return _SURROGATE.sub(REPLACEMENT_CHARACTER, value)
    if isinstance(value, _NotFinite):
        if not value.json_number:
            raise Unrepresentable(str(_problem(value)))
        return value.text
    if isinstance(value, _BigInteger):
        return value.text
    return str(value)  # an int beyond 64 bits


def repair_unwritable(value: Any) -> tuple[Any, tuple[str, ...]]:
    """A trusted value (a signed or listed order, read with `strict_json(writable=False)`) in a form
    every update can carry, and the places repaired (the first MAX_REPAIRED_PLACES, as
    `customer.name`, `meta.ids[2]`; a key as `meta.<repaired key> (key)`): lone surrogates become
    U+FFFD, integers beyond 64 bits and numbers beyond a double the string of their digits. A
    repaired key that another key of its object already spells gets one more U+FFFD, so no value is
    dropped. Raises Unrepresentable (naming the place) for `NaN`, `Infinity` or nesting deeper than
    any update is written. A value that needs no repair is returned as it is."""
    try:
        orjson.dumps(value)
    except orjson.JSONEncodeError:
        pass
    else:
        return value, ()
    places: list[str] = []

    def note(place: str) -> None:
        if len(places) < MAX_REPAIRED_PLACES:
            places.append(place[:MAX_PLACE_CHARS])

    def repaired(item: Any, place: str, depth: int) -> Any:
        if isinstance(item, dict | list) and depth >= _WRITABLE_DEPTH:
            raise Unrepresentable(f"{place or 'the value'} is nested too deeply")
        if isinstance(item, dict):
            result: dict[str, Any] = {}
            for key, child in item.items():
                name = key
                if _problem(key) is not None:
                    name = _repaired_scalar(key)
                    while name in item or name in result:
                        name += REPLACEMENT_CHARACTER
                    note(f"{place}.{name} (key)" if place else f"{name} (key)")
                inner = f"{place}.{name}" if place else str(name)
                result[name] = repaired(child, inner, depth + 1)
            return result
        if isinstance(item, list):
            return [repaired(child, f"{place}[{i}]", depth + 1) for i, child in enumerate(item)]
        if _problem(item) is None:
            return item
        try:
            fixed = _repaired_scalar(item)
        except Unrepresentable as exc:
            raise Unrepresentable(f"{place or 'the value'} {exc}") from None
        note(place or "the value")
        return fixed

    return repaired(value, "", 0), tuple(places)


def read_trusted(data: bytes | str) -> tuple[Any, tuple[str, ...]]:
    """JSON from a source we trust (a signed payload, Intergiro's API) as `strict_json` reads it, with
    what no update could carry repaired (`repair_unwritable`), and the places repaired; Unrepresentable
    only for `NaN`, `Infinity` or nesting deeper than any update is written."""
    try:
        return strict_json(data), ()
    except Unrepresentable:
        return repair_unwritable(strict_json(data, writable=False))


def _base64url_decode(segment: bytes) -> bytes:
    """Lenient base64url (padding optional), as PyJWT's `base64url_decode`."""
    return base64.urlsafe_b64decode(segment + b"=" * (-len(segment) % 4))


def _strict_base64url(segment: bytes) -> bytes:
    """Base64url as PyJWT's JWS decoder accepts it: the alphabet only, at most two `=` of correct
    padding, and the one canonical encoding of its bytes (so a signature cannot be re-spelled).

    Raises ValueError otherwise. All of it runs in C but for a few comparisons: pybase64 (SIMD, a sixth
    of binascii's time) checks the alphabet but for `+` and `/`, which it would read as `-` and `_`,
    and only the last character can spell the same bytes another way.
    """
    stripped = segment.rstrip(b"=")
    padded = len(segment) - len(stripped)
    rest = len(stripped) % 4
    if rest == 1 or (padded and (padded > 2 or len(segment) % 4)):
        raise ValueError("bad base64url padding")
    if rest and stripped[-1] not in _CANONICAL_LAST[rest]:
        raise ValueError("not the canonical base64url of its bytes")
    if b"+" in stripped or b"/" in stripped:
        raise ValueError("not base64url")
    return pybase64.b64decode(stripped + _PADDING[rest], altchars=b"-_", validate=True)


def _decode_header(segment: bytes) -> tuple[dict[str, Any], bool]:
    """A token's header, and whether its segment is strict base64url: checked here so that the header
    is decoded once (a strict decoding is also the lenient one). Raises BadCallback or NotTrusted."""
    try:
        strict: bytes | None = _strict_base64url(segment)
    except ValueError:
        strict = None  # refused as malformed later, after the checks PyJWT makes first
    try:
        header = strict_json(_base64url_decode(segment) if strict is None else strict)
    except DuplicateKey:
        # A header read one way by us and another by PyJWT (`alg` twice) is an attack, not a typo.
        raise NotTrusted("token header repeats a key") from None
    except (ValueError, binascii.Error, UnicodeDecodeError, RecursionError):
        raise BadCallback("token header is not base64url JSON") from None
    if not isinstance(header, dict):
        raise BadCallback("token header is not a JSON object")
    return header, strict is not None


# Intergiro signs every callback under the same short header: each such header is decoded once. The
# dicts are shared, so verify_local only reads them (check_header, _signed_parts) and never hands
# them out; headers that fail to decode raise every time, as lru_cache keeps no exceptions.
_SHARED_HEADER_BYTES = 256
_shared_header = functools.lru_cache(maxsize=16)(_decode_header)


def _read_header(
    parts: list[bytes], decode: Callable[[bytes], tuple[dict[str, Any], bool]] = _decode_header
) -> tuple[dict[str, Any], bool]:
    """`read_header` of a token split at its dots, and whether its header segment is strict base64url."""
    if len(parts) < 2 or not parts[0]:
        raise BadCallback("body is not a JWT (expected three dot-separated parts)")
    header, strict = decode(parts[0])
    if len(parts) != 3 or not parts[1]:
        raise NotTrusted("token is not one payload with one signature")
    return header, strict


def read_header(token: bytes) -> dict[str, Any]:
    """The JOSE header of a compact JWS; raises BadCallback when the body is not a JWT at all, and
    NotTrusted when it is a token but not one signed payload with one signature."""
    return _read_header(token.split(b"."))[0]


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


def _signature_matches(key: TrustedKey, signing_input: bytes, signature: bytes) -> bool:
    try:
        if key.algorithm == "RS256":
            key.key.verify(signature, signing_input, _PKCS1V15, _SHA256)
        else:  # ES256: the JWS signature is r || s, 32 bytes each (RFC 7518 3.4)
            if len(signature) != 64:
                return False
            der = encode_dss_signature(int.from_bytes(signature[:32]), int.from_bytes(signature[32:]))
            key.key.verify(der, signing_input, _ECDSA_SHA256)
    except InvalidSignature:
        return False
    return True


def _signed_parts(
    token: bytes, parts: list[bytes], header: dict[str, Any], header_is_strict: bool
) -> tuple[bytes, bytes, bytes]:
    """(signing input, payload, signature) of a compact JWS; NotTrusted when it is malformed."""
    if not isinstance(header.get("kid", ""), str) or header.get("b64", True) is False:
        raise NotTrusted("token is malformed")  # as PyJWT: `kid` not a string, detached payload
    if header_is_strict:
        try:
            payload, signature = _strict_base64url(parts[1]), _strict_base64url(parts[2])
        except ValueError:
            pass
        else:
            return token.rpartition(b".")[0], payload, signature
    raise NotTrusted("token is malformed")


def verify_local(token: bytes, keys: Sequence[TrustedKey], audience: str) -> Verified:
    """Verify a compact JWS against the trusted keys; raises NotTrusted or BadCallback."""
    parts = token.split(b".")
    short = len(parts[0]) <= _SHARED_HEADER_BYTES
    header, header_is_strict = _read_header(parts, _shared_header if short else _decode_header)
    alg = check_header(header)
    candidates = [key for key in keys if key.algorithm == alg]
    if not candidates:
        raise NoKeyVerifies("no trusted key verifies the signature")
    signing_input, payload, signature = _signed_parts(token, parts, header, header_is_strict)
    for key in candidates:
        if not _signature_matches(key, signing_input, signature):
            continue
        try:
            claims, repaired = read_trusted(payload)
        except Unrepresentable as exc:  # signed, so Intergiro's own: refused as content, not as a forgery
            claims = strict_json(payload, writable=False)  # unless its claims make it no token for us
            if isinstance(claims, dict):
                check_claims(claims, audience)
            raise BadCallback(f"token payload: {exc}") from None
        except (ValueError, UnicodeDecodeError, RecursionError):
            raise NotTrusted("token payload is not a JSON object (or repeats a key)") from None
        if not isinstance(claims, dict):
            raise NotTrusted("token payload is not a JSON object")
        check_claims(claims, audience)
        return Verified(order=claims, verified_by=f"local:{key.name}", repaired=repaired)
    raise NoKeyVerifies("no trusted key verifies the signature")


def unverified_claims(token: bytes) -> dict[str, Any]:
    """The payload of a well-formed compact JWS, its signature NOT checked: what remote verification
    needs before it may send a token to Intergiro. Well-formed is three strict base64url segments, a
    JSON object header with an accepted `alg` and no key of its own, and a JSON object payload;
    anything else raises BadCallback (400), so junk is refused here and never costs a call."""
    parts = token.split(b".")
    try:
        if len(parts) != 3 or not all(parts):
            raise ValueError("not three segments")
        header, payload, _ = (_strict_base64url(part) for part in parts)
    except ValueError:
        raise BadCallback("body is not a JWS (three base64url segments)") from None
    try:
        decoded = strict_json(header)
        claims = strict_json(payload, writable=False)  # Intergiro's answer is what is stored, repaired
    except (ValueError, UnicodeDecodeError, RecursionError):
        raise BadCallback("token header or payload is not JSON (or repeats a key)") from None
    if not isinstance(decoded, dict) or not isinstance(claims, dict):
        raise BadCallback("token header or payload is not a JSON object")
    try:
        check_header(decoded)
    except NotTrusted as exc:
        raise BadCallback(exc.reason) from None
    return claims

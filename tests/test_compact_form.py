"""The compact-form checks the receiver makes itself since it verifies signatures without PyJWT:
a signature or payload spelled any way but the one canonical base64url is refused, like PyJWT did."""

from __future__ import annotations

import base64
import itertools
import json
import re
import time
from collections.abc import Callable
from typing import Any

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from hypothesis import given, settings
from hypothesis import strategies as st

from receiver.errors import NotTrusted
from receiver.keys import load_public_key
from receiver.verify import NoKeyVerifies, _strict_base64url, verify_local
from tests.conftest import pem_public
from tests.helpers import JWT, card_order, token

ALPHABET = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"


def respelled(segment: str) -> str:
    """The same bytes in a non-canonical spelling: flip a spare low bit of the last character."""
    last = ALPHABET.index(segment[-1])
    return segment[:-1] + ALPHABET[last ^ 1]


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def rs256_by_hand(header: dict[str, Any], rsa_key: Any) -> bytes:
    """A correctly signed RS256 token with a header PyJWT itself would refuse to write."""
    claims = {"iss": "payfunc", "aud": "production", "iat": int(time.time()), **card_order()}
    signing_input = f"{_b64(json.dumps(header).encode())}.{_b64(json.dumps(claims).encode())}"
    signature = rsa_key.sign(signing_input.encode(), padding.PKCS1v15(), hashes.SHA256())
    return f"{signing_input}.{_b64(signature)}".encode()


def variants(rsa_key: Any, ec_key: Any) -> dict[str, bytes]:
    header, payload, signature = token(card_order(), rsa_key).decode().split(".")
    es_header, es_payload, es_signature = token(card_order(), ec_key, algorithm="ES256").decode().split(".")
    short_es = base64.urlsafe_b64encode(base64.urlsafe_b64decode(es_signature + "==")[:63]).rstrip(b"=")
    assert base64.urlsafe_b64decode(respelled(signature) + "==") == base64.urlsafe_b64decode(signature + "==")
    return {
        "signature re-spelled": f"{header}.{payload}.{respelled(signature)}".encode(),
        "signature with three padding characters": f"{header}.{payload}.{signature}===".encode(),
        "signature with a character outside base64url": f"{header}.{payload}.{signature[:-1]}+".encode(),
        "payload with a character outside base64url": f"{header}.{payload[:-2]}!{payload[-1]}.{signature}".encode(),
        "payload of impossible length": f"{header}.{payload}A.{signature}".encode(),
        "key id that is not a string": rs256_by_hand({"alg": "RS256", "kid": 7}, rsa_key),
        "detached payload (b64 false)": rs256_by_hand({"alg": "RS256", "b64": False}, rsa_key),
        "ES256 signature one byte short": f"{es_header}.{es_payload}.{short_es.decode()}".encode(),
        "ES256 signature as DER instead of r||s": f"{es_header}.{es_payload}.{signature}".encode(),
    }


@pytest.mark.parametrize(
    "case",
    ["signature re-spelled", "signature with three padding characters", "signature with a character outside base64url",
     "payload with a character outside base64url", "payload of impossible length",
     "key id that is not a string", "detached payload (b64 false)", "ES256 signature one byte short",
     "ES256 signature as DER instead of r||s"],
)  # fmt: skip
async def test_a_token_not_in_canonical_compact_form_is_refused_401_and_queues_nothing(
    receiver: Any, sync_redis: Any, rsa_key: Any, ec_key: Any, case: str
) -> None:
    answer = await receiver.post("/callbacks/intergiro", data=variants(rsa_key, ec_key)[case], headers=JWT)
    assert answer.status == 401, await answer.text()
    assert list(sync_redis.scan_iter("*")) == []


async def test_a_token_signed_by_hand_with_a_string_key_id_is_accepted(receiver: Any, rsa_key: Any) -> None:
    answer = await receiver.post(
        "/callbacks/intergiro", data=rs256_by_hand({"alg": "RS256", "kid": "any"}, rsa_key), headers=JWT
    )
    assert answer.status == 200, await answer.text()


# --- each segment, under a signature that is valid for it as written ------------------------------------
# A refusal here can only come from the compact-form check: the signature matches the segments exactly as
# they are spelled, so without the check the token would verify (and NoKeyVerifies would be the answer
# for a bad signature, not "malformed").

ISSUED_MS = 1_600_000_000_000  # fixed, so that the segments, and which filler gives which spelling, are too


def _segment(value: dict[str, Any], field: str, rest: int, holding: str = "") -> str:
    """Canonical base64url JSON of `value` plus a filler `field`, chosen so that the segment is
    `rest` characters past a multiple of four and holds the character `holding`."""
    for size in range(6):
        for filler in itertools.product("?>~", repeat=size):
            segment = _b64(json.dumps({**value, field: "".join(filler)}).encode())
            if len(segment) % 4 == rest and holding in segment:
                return segment
    raise AssertionError(f"no filler gives a segment of rest {rest} holding {holding!r}")


def header_segment(rest: int = 2, holding: str = "", alg: str = "RS256") -> str:
    return _segment({"alg": alg, "typ": "JWT"}, "kid", rest, holding)


def payload_segment(rest: int = 2, holding: str = "") -> str:
    claims = {"iss": "payfunc", "aud": "production", "iat": ISSUED_MS, **card_order()}
    return _segment(claims, "note", rest, holding)


def signed_as_written(header: str, payload: str, key: Any, signature: Callable[[str], str] = str) -> bytes:
    """`header.payload.signature`, signed over the two segments exactly as given; `signature` may
    re-spell the canonical base64url of the signature."""
    signing_input = f"{header}.{payload}".encode()
    if isinstance(key, ec.EllipticCurvePrivateKey):
        r, s = decode_dss_signature(key.sign(signing_input, ec.ECDSA(hashes.SHA256())))
        raw = r.to_bytes(32) + s.to_bytes(32)
    else:
        raw = key.sign(signing_input, padding.PKCS1v15(), hashes.SHA256())
    return signing_input + b"." + signature(_b64(raw)).encode()


def swap(old: str, new: str) -> Callable[[str], str]:
    return lambda segment: segment.replace(old, new, 1)


def rsa_signature_holding(character: str, rsa_key: Any) -> tuple[str, str]:
    """A header and payload whose RS256 signature's base64url holds `character` (most do)."""
    for rest in (2, 3, 0):
        header, payload = header_segment(), payload_segment(rest)
        if character in signed_as_written(header, payload, rsa_key).decode().rsplit(".", 1)[1]:
            return header, payload
    raise AssertionError(f"no signature holds {character!r}")


MALFORMED: dict[str, Callable[[Any, Any], bytes]] = {
    "header re-spelled": lambda rsa, ec_: signed_as_written(respelled(header_segment(2)), payload_segment(), rsa),
    "header re-spelled (two spare bits)": lambda rsa, ec_: signed_as_written(
        respelled(header_segment(3)), payload_segment(), rsa),
    "payload re-spelled": lambda rsa, ec_: signed_as_written(header_segment(), respelled(payload_segment(2)), rsa),
    "payload re-spelled (two spare bits)": lambda rsa, ec_: signed_as_written(
        header_segment(), respelled(payload_segment(3)), rsa),
    "RS256 signature re-spelled": lambda rsa, ec_: signed_as_written(
        header_segment(), payload_segment(), rsa, respelled),
    "ES256 signature re-spelled": lambda rsa, ec_: signed_as_written(
        header_segment(alg="ES256"), payload_segment(), ec_, respelled),
    "header with + for -": lambda rsa, ec_: signed_as_written(
        swap("-", "+")(header_segment(holding="-")), payload_segment(), rsa),
    "header with / for _": lambda rsa, ec_: signed_as_written(
        swap("_", "/")(header_segment(holding="_")), payload_segment(), rsa),
    "payload with + for -": lambda rsa, ec_: signed_as_written(
        header_segment(), swap("-", "+")(payload_segment(holding="-")), rsa),
    "payload with / for _": lambda rsa, ec_: signed_as_written(
        header_segment(), swap("_", "/")(payload_segment(holding="_")), rsa),
    "signature with + for -": lambda rsa, ec_: signed_as_written(
        *rsa_signature_holding("-", rsa), rsa, swap("-", "+")),
    "signature with / for _": lambda rsa, ec_: signed_as_written(
        *rsa_signature_holding("_", rsa), rsa, swap("_", "/")),
    "header padded with one = too many": lambda rsa, ec_: signed_as_written(
        header_segment(2) + "===", payload_segment(), rsa),
    "header of whole groups padded": lambda rsa, ec_: signed_as_written(
        header_segment(0) + "=", payload_segment(), rsa),
    "payload padded short": lambda rsa, ec_: signed_as_written(header_segment(), payload_segment(2) + "=", rsa),
    "payload padded with one = too many": lambda rsa, ec_: signed_as_written(
        header_segment(), payload_segment(3) + "==", rsa),
    "payload of whole groups padded": lambda rsa, ec_: signed_as_written(
        header_segment(), payload_segment(0) + "==", rsa),
    "payload with = inside": lambda rsa, ec_: signed_as_written(
        header_segment(), (lambda p: p[:8] + "=" + p[8:])(payload_segment(3)), rsa),
    "signature padded short": lambda rsa, ec_: signed_as_written(
        header_segment(), payload_segment(), rsa, lambda s: s + "="),
    "signature with = inside": lambda rsa, ec_: signed_as_written(
        header_segment(), payload_segment(), rsa, lambda s: s[:8] + "==" + s[8:]),
}  # fmt: skip


@pytest.fixture(scope="module")
def trusted(rsa_key: Any, ec_key: Any) -> tuple[Any, ...]:
    return (load_public_key(pem_public(rsa_key)), load_public_key(pem_public(ec_key)))


@pytest.mark.parametrize("case", MALFORMED)
def test_a_segment_not_in_canonical_base64url_is_refused_as_malformed_though_its_signature_matches(
    trusted: tuple[Any, ...], rsa_key: Any, ec_key: Any, case: str
) -> None:
    with pytest.raises(NotTrusted, match="token is malformed") as refused:
        verify_local(MALFORMED[case](rsa_key, ec_key), trusted, "production")
    assert not isinstance(refused.value, NoKeyVerifies)  # refused as malformed, never sent on to remote


@pytest.mark.parametrize(
    "padded",
    ["header", "payload", "RS256 signature", "ES256 signature", "all three"],
)  # fmt: skip
def test_segments_with_exactly_their_padding_are_accepted_as_pyjwt_accepts_them(
    trusted: tuple[Any, ...], rsa_key: Any, ec_key: Any, padded: str
) -> None:
    def pad(segment: str, which: str) -> str:
        return segment + "=" * (-len(segment) % 4) if which in padded or padded == "all three" else segment

    key, alg = (ec_key, "ES256") if padded.startswith("ES256") else (rsa_key, "RS256")
    header, payload = pad(header_segment(2, alg=alg), "header"), pad(payload_segment(3), "payload")
    token = signed_as_written(header, payload, key, lambda s: pad(s, "signature"))
    assert token.count(b"=") == {"header": 2, "payload": 1, "all three": 5}.get(padded, 2)
    assert verify_local(token, trusted, "production").order["id"] == "TestOrder0000001"


def test_a_header_once_read_is_refused_when_later_re_spelled(trusted: tuple[Any, ...], rsa_key: Any) -> None:
    """Decoded headers are remembered by their exact bytes: a re-spelling is a header of its own."""
    header = header_segment(2)
    verify_local(signed_as_written(header, payload_segment(), rsa_key), trusted, "production")
    with pytest.raises(NotTrusted, match="token is malformed"):
        verify_local(signed_as_written(respelled(header), payload_segment(), rsa_key), trusted, "production")


def plain_strict_base64url(segment: bytes) -> bytes:
    """The compact-form check written the plain way (decode, encode again, compare): the reference."""
    stripped = segment.rstrip(b"=")
    padded = len(segment) - len(stripped)
    if padded > 2 or (padded and len(segment) % 4) or len(stripped) % 4 == 1:
        raise ValueError("bad padding")
    if not re.fullmatch(rb"[A-Za-z0-9_-]*", stripped):
        raise ValueError("not base64url")
    decoded = base64.urlsafe_b64decode(stripped + b"=" * (-len(stripped) % 4))
    if base64.urlsafe_b64encode(decoded).rstrip(b"=") != stripped:
        raise ValueError("not canonical")
    return decoded


def _outcome(check: Callable[[bytes], bytes], segment: bytes) -> bytes | str:
    try:
        return check(segment)
    except ValueError:
        return "refused"


@st.composite
def segments(draw: st.DrawFn) -> bytes:
    """Short strings of the characters that matter, or the base64url of some bytes with one character
    changed (or not) and padding added (or not)."""
    if draw(st.booleans()):
        return draw(st.text("AQgwBEf_-+/=!. \n\x80", max_size=10)).encode("latin-1")
    segment = _b64(draw(st.binary(max_size=20)))
    at = draw(st.integers(0, len(segment)))
    character = draw(st.sampled_from([*ALPHABET, "+", "/", "=", "!"]))
    return (
        segment[:at] + character + segment[at + 1 :] + draw(st.sampled_from(["", "=", "==", "==="]))
    ).encode()


@settings(max_examples=3000, deadline=None)
@given(segments())
def test_the_compact_form_check_accepts_exactly_what_decoding_and_encoding_again_accepts(
    segment: bytes,
) -> None:
    assert _outcome(_strict_base64url, segment) == _outcome(plain_strict_base64url, segment)

"""The compact-form checks the receiver makes itself since it verifies signatures without PyJWT:
a signature or payload spelled any way but the one canonical base64url is refused, like PyJWT did."""

from __future__ import annotations

import base64
import json
import time
from typing import Any

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding

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

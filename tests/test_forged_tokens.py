"""Forged tokens, one table: every well-formed token that is not Intergiro's (or a configured key's)
honest signature over the callback is answered 401 and nothing is stored.

Bodies that are not a JWT at all (400) are in `test_callbacks.py` and `test_fuzz.py`.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from jwt.algorithms import get_default_algorithms

from receiver.keys import intergiro_key, load_public_key
from tests.conftest import pem_public, real_callbacks
from tests.helpers import JWT, card_order

PATH = "/callbacks/intergiro"
REAL_TOKENS = [line["body"] for line in real_callbacks("order-jwt")]
STRANGER_EC = ec.generate_private_key(ec.SECP256R1())
ED25519 = ed25519.Ed25519PrivateKey.generate()
HOUR_S = 3600
NONE_HEADER = base64.urlsafe_b64encode(b'{"alg":"none","typ":"JWT"}').rstrip(b"=").decode()


@dataclass(frozen=True)
class Keys:
    rsa: Any  # trusted by the default test receiver
    ec: Any  # trusted by the default test receiver
    stranger: Any  # an RSA key nobody trusts


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def now_ms() -> int:
    return int(time.time() * 1000)


def claims(**changes: Any) -> dict[str, Any]:
    return {"iss": "payfunc", "aud": "production", "iat": now_ms(), **card_order(), **changes}


def raw_token(header: dict[str, Any] | bytes, payload: dict[str, Any] | bytes, key: Any, alg: str) -> bytes:
    """A compact JWS signed with `alg`, whatever the header says (bytes are used exactly as given)."""
    header_bytes = header if isinstance(header, bytes) else json.dumps(header).encode()
    payload_bytes = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    signing_input = f"{b64(header_bytes)}.{b64(payload_bytes)}".encode()
    if alg.startswith("HS"):
        digest = {"HS256": hashlib.sha256, "HS384": hashlib.sha384, "HS512": hashlib.sha512}[alg]
        signature = hmac.new(key, signing_input, digest).digest()
    else:
        signature = get_default_algorithms()[alg].sign(signing_input, key)
    return signing_input + b"." + b64(signature).encode()


def rs256(payload: dict[str, Any] | bytes, key: Any, **header: Any) -> bytes:
    return raw_token({"alg": "RS256", "typ": "JWT", **header}, payload, key, "RS256")


def es256(payload: dict[str, Any] | bytes, key: Any, **header: Any) -> bytes:
    return raw_token({"alg": "ES256", "typ": "JWT", **header}, payload, key, "ES256")


def segments(token: bytes | str) -> list[str]:
    return (token.decode() if isinstance(token, bytes) else token).split(".")


def tampered(keys: Keys) -> bytes:
    header, _, signature = segments(rs256(claims(), keys.rsa))
    return f"{header}.{b64(json.dumps(claims(items=1)).encode())}.{signature}".encode()


def duplicate_in_payload(keys: Keys) -> bytes:
    # Python's json keeps the last `aud`, another parser the first: refuse rather than pick one.
    text = json.dumps(claims(aud="development"))[:-1] + ', "aud": "production"}'
    return rs256(text.encode(), keys.rsa)


def signature_of(token: bytes | str) -> str:
    return segments(token)[2]


def public_forms(public_key: Any) -> dict[str, bytes]:
    """A public key as an attacker might paste it in as an HMAC secret."""
    der = public_key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    pem = public_key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    return {"PEM": pem, "PEM without newline": pem.strip(), "DER": der, "base64 DER": base64.b64encode(der)}


def trusted_public_keys(keys: Keys) -> dict[str, Any]:
    return {
        "intergiro production key": intergiro_key("production").key,
        "test RSA key": keys.rsa.public_key(),
        "test EC key": keys.ec.public_key(),
    }


@dataclass(frozen=True)
class Forgery:
    name: str
    forge: Callable[[Keys], bytes]
    environment: str = "production"
    trusts: tuple[str, ...] = ("rsa", "ec")  # which test keys the receiver trusts besides Intergiro's


FORGERIES = [
    # signature and key
    Forgery("tampered payload", tampered),
    Forgery("signed with a key nobody trusts", lambda k: rs256(claims(), k.stranger)),
    Forgery("signature of another test token", lambda k: f"{'.'.join(segments(rs256(claims(), k.rsa))[:2])}."
            f"{signature_of(rs256(claims(id='OtherOrder000001'), k.rsa))}".encode()),
    Forgery("signature of a real Intergiro token", lambda k: f"{'.'.join(segments(rs256(claims(), k.rsa))[:2])}."
            f"{signature_of(REAL_TOKENS[0])}".encode()),
    Forgery("real token with the signature of another real token",
            lambda k: f"{'.'.join(segments(REAL_TOKENS[0])[:2])}.{signature_of(REAL_TOKENS[1])}".encode()),
    Forgery("empty signature", lambda k: f"{'.'.join(segments(rs256(claims(), k.rsa))[:2])}.".encode()),
    Forgery("second signature appended (4 segments)",
            lambda k: rs256(claims(), k.rsa) + b"." + signature_of(rs256(claims(), k.rsa)).encode()),
    Forgery("another key's signature appended (4 segments)",
            lambda k: rs256(claims(), k.rsa) + b"." + signature_of(rs256(claims(), k.stranger)).encode()),
    Forgery("two signatures run together in one segment",
            lambda k: rs256(claims(), k.rsa) + signature_of(rs256(claims(), k.stranger)).encode()),
    Forgery("header and payload only", lambda k: ".".join(segments(rs256(claims(), k.rsa))[:2]).encode()),
    # algorithm
    Forgery("alg none", lambda k: f"{NONE_HEADER}.{b64(json.dumps(claims()).encode())}.".encode()),
    Forgery("alg none with the real signature kept",
            lambda k: f"{NONE_HEADER}.{'.'.join(segments(rs256(claims(), k.rsa))[1:])}".encode()),
    Forgery("alg missing", lambda k: raw_token({"typ": "JWT"}, claims(), k.rsa, "RS256")),
    Forgery("alg rs256 (lower case)", lambda k: raw_token({"alg": "rs256"}, claims(), k.rsa, "RS256")),
    Forgery("alg 'RS256 ' (trailing space)", lambda k: raw_token({"alg": "RS256 "}, claims(), k.rsa, "RS256")),
    Forgery("alg as a list", lambda k: raw_token({"alg": ["RS256"]}, claims(), k.rsa, "RS256")),
    Forgery("RS384 from a trusted RSA key", lambda k: raw_token({"alg": "RS384"}, claims(), k.rsa, "RS384")),
    Forgery("PS256 from a trusted RSA key", lambda k: raw_token({"alg": "PS256"}, claims(), k.rsa, "PS256")),
    Forgery("EdDSA", lambda k: raw_token({"alg": "EdDSA"}, claims(), ED25519, "EdDSA")),
    Forgery("ES384 header", lambda k: raw_token({"alg": "ES384"}, claims(), k.ec, "ES256")),
    # keys of the wrong type
    Forgery("RS256 signature under an ES256 header", lambda k: raw_token({"alg": "ES256"}, claims(), k.rsa, "RS256")),
    Forgery("ES256 signature under an RS256 header", lambda k: raw_token({"alg": "RS256"}, claims(), k.ec, "ES256")),
    Forgery("ES256 from an EC key nobody trusts", lambda k: es256(claims(), STRANGER_EC)),
    Forgery("ES256 token on a receiver that trusts only RSA keys", lambda k: es256(claims(), k.ec), trusts=("rsa",)),
    Forgery("RS256 token from the test key on a receiver that trusts only an EC key",
            lambda k: rs256(claims(), k.rsa), trusts=("ec",)),
    # header parameters that name a key or demand processing
    Forgery("jku header", lambda k: rs256(claims(), k.stranger, jku="https://evil.example/keys")),
    Forgery("x5u header", lambda k: rs256(claims(), k.stranger, x5u="https://evil.example/cert")),
    Forgery("jwk header (even signed by a trusted key)",
            lambda k: rs256(claims(), k.rsa, jwk={"kty": "RSA", "n": "x", "e": "AQAB"})),
    Forgery("x5c header", lambda k: rs256(claims(), k.rsa, x5c=["MIIB"])),
    Forgery("crit header", lambda k: rs256(claims(), k.rsa, crit=["exp"], exp=1)),
    Forgery("duplicate alg in header (none, then RS256)",
            lambda k: raw_token(b'{"alg":"none","typ":"JWT","alg":"RS256"}', claims(), k.rsa, "RS256")),
    Forgery("duplicate key in payload", duplicate_in_payload),
    # issuer and audience
    Forgery("wrong issuer", lambda k: rs256(claims(iss="someone"), k.rsa)),
    Forgery("no issuer", lambda k: rs256({key: v for key, v in claims().items() if key != "iss"}, k.rsa)),
    Forgery("wrong audience", lambda k: rs256(claims(aud="staging"), k.rsa)),
    Forgery("no audience", lambda k: rs256({key: v for key, v in claims().items() if key != "aud"}, k.rsa)),
    Forgery("audience list without ours", lambda k: rs256(claims(aud=["staging", "development"]), k.rsa)),
    Forgery("development token on a production receiver", lambda k: rs256(claims(aud="development"), k.rsa)),
    Forgery("production token on a development receiver", lambda k: rs256(claims(), k.rsa),
            environment="development"),
    # time
    Forgery("expired exp (seconds)", lambda k: rs256(claims(exp=int(time.time()) - HOUR_S), k.rsa)),
    Forgery("expired exp (milliseconds)", lambda k: rs256(claims(exp=now_ms() - HOUR_S * 1000), k.rsa)),
    Forgery("nbf in the future (seconds)", lambda k: rs256(claims(nbf=int(time.time()) + HOUR_S), k.rsa)),
    Forgery("nbf in the future (milliseconds)", lambda k: rs256(claims(nbf=now_ms() + HOUR_S * 1000), k.rsa)),
    Forgery("iat in the future (seconds)", lambda k: rs256(claims(iat=int(time.time()) + HOUR_S), k.rsa)),
    Forgery("iat in the future (milliseconds)", lambda k: rs256(claims(iat=now_ms() + HOUR_S * 1000), k.rsa)),
    Forgery("iat as a string", lambda k: rs256(claims(iat=str(now_ms())), k.rsa)),
    Forgery("exp too large for a float", lambda k: rs256(claims(exp=10**400), k.rsa)),
    Forgery("iat NaN", lambda k: rs256(json.dumps(claims(iat=float("nan"))).encode(), k.rsa)),
    # HMAC with a public key as the secret: every trusted key, every form, every HS algorithm
    *(
        Forgery(f"{alg} with the {name} ({form}) as secret",
                lambda k, alg=alg, name=name, form=form: raw_token(
                    {"alg": alg, "typ": "JWT"}, claims(), public_forms(trusted_public_keys(k)[name])[form], alg))
        for alg in ("HS256", "HS384", "HS512")
        for name in ("intergiro production key", "test RSA key", "test EC key")
        for form in ("PEM", "PEM without newline", "DER", "base64 DER")
    ),
    # Intergiro's development key is not ours to sign with: its real production tokens stand in, refused
    # by a development receiver, as a development token would be by a production one (above).
    *(
        Forgery(f"real production token {number} on a development receiver", lambda k, body=body: body.encode(),
            environment="development")
        for number, body in enumerate(REAL_TOKENS)
    ),
]  # fmt: skip


@pytest.fixture
def keys(rsa_key: Any, ec_key: Any, stranger_key: Any) -> Keys:
    return Keys(rsa=rsa_key, ec=ec_key, stranger=stranger_key)


def receiver_changes(forgery: Forgery, keys: Keys) -> dict[str, Any]:
    public = {"rsa": keys.rsa, "ec": keys.ec}
    return {
        "intergiro_environment": forgery.environment,
        "intergiro_public_keys": tuple(load_public_key(pem_public(public[name])) for name in forgery.trusts),
    }


@pytest.mark.parametrize("forgery", FORGERIES, ids=lambda f: f.name)
async def test_a_forged_token_is_refused_401_and_stores_nothing(
    make_receiver: Any, sync_redis: Any, keys: Keys, forgery: Forgery
) -> None:
    receiver = await make_receiver(**receiver_changes(forgery, keys))
    answer = await receiver.post(PATH, data=forgery.forge(keys), headers=JWT)
    assert answer.status == 401, await answer.text()
    assert (await answer.json())["error"] == "not authorized"
    assert list(sync_redis.scan_iter("*")) == []


@pytest.mark.parametrize(
    ("name", "honest"),
    [
        ("RS256 from the test RSA key", lambda k: rs256(claims(), k.rsa)),
        ("ES256 from the test EC key", lambda k: es256(claims(), k.ec)),
        ("with exp, nbf and iat all in range", lambda k: rs256(
            claims(exp=int(time.time()) + HOUR_S, nbf=int(time.time()) - 60), k.rsa)),
        ("with an audience list holding ours", lambda k: rs256(claims(aud=["staging", "production"]), k.rsa)),
        ("a PyJWT-made token", lambda k: jwt.encode(claims(), k.rsa, algorithm="RS256").encode()),
    ],
    ids=lambda v: v if isinstance(v, str) else "",
)  # fmt: skip
async def test_the_honest_tokens_the_forgeries_start_from_are_accepted(
    receiver: Any, keys: Keys, name: str, honest: Callable[[Keys], bytes]
) -> None:
    answer = await receiver.post(PATH, data=honest(keys), headers=JWT)
    assert answer.status == 200, await answer.text()

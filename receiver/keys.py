"""Trusted public keys: Intergiro's published keys plus the ones configured in `INTERGIRO_PUBLIC_KEYS`.

Keys come only from here, never from a token's header (`jku`, `x5u`, `jwk`, `kid` are not looked at).
"""

from __future__ import annotations

import base64
import binascii
import functools
import hashlib
import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

INTERGIRO_ENVIRONMENTS = ("production", "development")


@dataclass(frozen=True)
class TrustedKey:
    """One public key and the only JWS algorithm it may verify."""

    name: str
    algorithm: str  # "RS256" or "ES256": fixed by the key's type, never by the token
    key: Any  # RSAPublicKey | EllipticCurvePublicKey

    def __repr__(self) -> str:
        return f"TrustedKey({self.name}, {self.algorithm})"


def _fingerprint(der: bytes) -> str:
    return hashlib.sha256(der).hexdigest()[:12]


def load_public_key(text: str) -> TrustedKey:
    """A key from PEM or base64 SPKI DER; raises ValueError with a short reason."""
    text = text.strip()
    try:
        if text.startswith("-----BEGIN"):
            key = serialization.load_pem_public_key(text.encode())
        else:
            key = serialization.load_der_public_key(base64.b64decode("".join(text.split()), validate=True))
    except (ValueError, binascii.Error, TypeError) as exc:
        raise ValueError(f"not a PEM or base64 SPKI public key ({type(exc).__name__})") from None
    der = key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    if isinstance(key, rsa.RSAPublicKey):
        if key.key_size < 2048:
            raise ValueError(f"RSA key of {key.key_size} bits is too small (2048 at least)")
        algorithm = "RS256"
    elif isinstance(key, ec.EllipticCurvePublicKey) and isinstance(key.curve, ec.SECP256R1):
        algorithm = "ES256"
    else:
        raise ValueError("only RSA (RS256) and P-256 (ES256) public keys are accepted")
    return TrustedKey(name=f"key-{_fingerprint(der)}", algorithm=algorithm, key=key)


def split_key_list(value: str) -> list[str]:
    """Split `INTERGIRO_PUBLIC_KEYS`: PEM blocks or base64 keys separated by commas, or `@path`."""
    value = value.strip()
    if not value:
        return []
    if value.startswith("@"):
        value = Path(value[1:]).read_text()
    if "-----BEGIN" in value:
        blocks, current = [], []
        for line in value.splitlines():
            if line.strip().strip(","):
                current.append(line.strip().strip(","))
            if line.startswith("-----END"):
                blocks.append("\n".join(current))
                current = []
        if any(part.strip() for part in current):
            blocks.append("\n".join(current))
        return blocks
    return [part for part in (p.strip() for p in value.replace("\n", ",").split(",")) if part]


@functools.cache
def intergiro_key(environment: str) -> TrustedKey:
    """Intergiro's published callback key for `environment`, shipped with the package."""
    published = json.loads(resources.files("receiver").joinpath("intergiro-keys.json").read_text())
    entry = published[environment]
    key = load_public_key(entry["spki_base64"])
    return TrustedKey(name=f"intergiro-{environment}", algorithm=entry["algorithm"], key=key.key)

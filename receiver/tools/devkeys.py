"""The files `dev` makes once in `.dev/`: a signing key pair the receiver trusts, the local sink's
Standard Webhooks secret and the ops console's token (each readable by this user only)."""

from __future__ import annotations

import base64
import os
import secrets
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

DEV_DIR = Path(".dev")
SIGNING_KEY = DEV_DIR / "signing-key.pem"
SIGNING_PUBLIC_KEY = DEV_DIR / "signing-key.pub.pem"
WEBHOOK_SECRET_FILE = DEV_DIR / "webhook-secret"
OPS_TOKEN_FILE = DEV_DIR / "ops-token"


def ensure_signing_key() -> None:
    """Make the dev signing key pair once: private key readable by this user only."""
    DEV_DIR.mkdir(exist_ok=True)
    if not SIGNING_KEY.exists():
        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        pem = key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        fd = os.open(SIGNING_KEY, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as out:
            out.write(pem)
        SIGNING_PUBLIC_KEY.unlink(missing_ok=True)
    if not SIGNING_PUBLIC_KEY.exists():
        private = serialization.load_pem_private_key(SIGNING_KEY.read_bytes(), password=None)
        SIGNING_PUBLIC_KEY.write_bytes(
            private.public_key().public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
            )
        )


def ensure_webhook_secret() -> str:
    """A Standard Webhooks secret for the local sink, made once (updates queued earlier still verify)."""
    DEV_DIR.mkdir(exist_ok=True)
    if not WEBHOOK_SECRET_FILE.exists():
        secret = "whsec_" + base64.b64encode(secrets.token_bytes(32)).decode()
        fd = os.open(WEBHOOK_SECRET_FILE, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as out:
            out.write(secret + "\n")
    return WEBHOOK_SECRET_FILE.read_text().strip()


def ensure_ops_token() -> str:
    """The ops console's token for dev, made once (signing in again needs it when the link is used)."""
    DEV_DIR.mkdir(exist_ok=True)
    if not OPS_TOKEN_FILE.exists():
        fd = os.open(OPS_TOKEN_FILE, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as out:
            out.write(secrets.token_urlsafe(32) + "\n")
    return OPS_TOKEN_FILE.read_text().strip()

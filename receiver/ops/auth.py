"""Sign-in to the ops console: the bearer token for scripts, a session cookie for people, CSRF tokens.

The cookie is a random nonce signed with the time it was made, by itsdangerous (HMAC-SHA256, its
signatures checked in constant time, expired after SESSION_SECONDS), with a key derived from OPS_TOKEN,
so changing the token signs everyone out; a session is stored nowhere, but one ended by signing out is
remembered in Redis until it would have expired (`RedisKeys.ops_session_ended`). A form's CSRF token is
the session's nonce signed for that purpose (another salt): a page from another site can neither read
it nor make a POST carry it. Every comparison of a secret is constant-time. A wrong token stops every
token check of the process for SIGN_IN_LOCKOUT_SECONDS (429 meanwhile); sessions go on.
"""

from __future__ import annotations

import hashlib
import hmac
import math
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass

from aiohttp import web
from itsdangerous import BadData, Signer, URLSafeTimedSerializer

from receiver.logs import log

COOKIE = "igr_ops_session"
SESSION_SECONDS = 8 * 3600  # a working day; then sign in again
# After a wrong token (form, bearer or link), no token is checked for this long: every sign-in in that
# time is answered 429 with Retry-After, before its token is looked at. One timestamp per process, so
# a flood of guesses holds nothing (where one waiting task per guess held tens of MB).
SIGN_IN_LOCKOUT_SECONDS = 1.0


@dataclass(frozen=True)
class Session:
    nonce: str
    expires: int


def _secret_bytes(text: str) -> bytes:
    """A secret as sent: aiohttp decodes headers, cookies and forms with `surrogateescape`, so bytes
    that are no UTF-8 (0xE9 0xFF) come back as they were and simply do not match."""
    return text.encode("utf-8", "surrogateescape")


class Authenticator:
    """Checks the bearer token and session cookies, and makes sessions and CSRF tokens."""

    def __init__(
        self,
        token: str,
        lockout_seconds: float = SIGN_IN_LOCKOUT_SECONDS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._token = token.encode()
        # Each signer's key is HMAC-SHA256(OPS_TOKEN, its salt): a session cannot pass as a CSRF token.
        self._sessions = URLSafeTimedSerializer(
            self._token,
            salt="intergiro-receiver ops session",
            signer_kwargs={"key_derivation": "hmac", "digest_method": hashlib.sha256},
        )
        self._csrf = Signer(
            self._token,
            salt="intergiro-receiver ops csrf",
            key_derivation="hmac",
            digest_method=hashlib.sha256,
        )
        self.lockout_seconds = lockout_seconds
        self._clock = clock
        self._locked_until = 0.0

    def locked_for(self) -> float:
        """Seconds until a token may be checked again (0: now); ask before checking any token."""
        return max(0.0, self._locked_until - self._clock())

    def token_matches(self, given: str) -> bool:
        return hmac.compare_digest(_secret_bytes(given), self._token)

    def bearer_matches(self, request: web.Request) -> bool:
        scheme, _, given = request.headers.get("Authorization", "").partition(" ")
        return scheme.lower() == "bearer" and self.token_matches(given.strip())

    def new_session(self) -> tuple[str, Session]:
        """A new session and its cookie value."""
        value = self._sessions.dumps(secrets.token_urlsafe(18))
        session = self._read(value)
        assert session is not None  # just signed
        return value, session

    def session(self, request: web.Request) -> Session | None:
        """The request's session, when its cookie is ours, intact and not expired (whether it was
        ended by signing out is the caller's to ask: that is stored in Redis)."""
        return self._read(request.cookies.get(COOKIE, ""))

    def _read(self, value: str) -> Session | None:
        if not value.isascii():  # ours are; bytes that are no UTF-8 are not a session
            return None
        try:
            nonce, signed_at = self._sessions.loads(value, max_age=SESSION_SECONDS, return_timestamp=True)
        except BadData:  # not signed by us, altered, or expired
            return None
        if not isinstance(nonce, str) or not nonce:
            return None
        return Session(nonce, int(signed_at.timestamp()) + SESSION_SECONDS)

    def csrf_token(self, session: Session) -> str:
        return self._csrf.get_signature(session.nonce).decode()

    def csrf_matches(self, session: Session, given: str) -> bool:
        # The signature's characters are ASCII: other text (bytes that are no UTF-8) is not one.
        return given.isascii() and self._csrf.verify_signature(session.nonce, given)

    def refuse(self, request: web.Request, what: str) -> None:
        """A failed sign-in: logged (never what was sent), and no token is checked for
        SIGN_IN_LOCKOUT_SECONDS, so guessing runs at most one try per that time per process."""
        self._locked_until = self._clock() + self.lockout_seconds
        log.warning("ops sign-in refused", what=what, remote=request.remote, path=request.path)

    def retry_after(self) -> str:
        """The Retry-After of a sign-in answered 429: whole seconds, at least 1."""
        return str(max(1, math.ceil(self.locked_for())))


def came_over_tls(request: web.Request, trust_forwarded_proto: bool) -> bool:
    """Whether the browser's request came over TLS: to this process, or (OPS_TRUST_FORWARDED_PROTO) to
    the proxy in front, as its `X-Forwarded-Proto: https` says. Only a proxy that sets the header itself
    may be trusted: a client reaching the console directly could send it too (harmless: the cookie then
    only gets Secure, which a plain-HTTP browser does not send back)."""
    if request.secure:
        return True
    forwarded = request.headers.get("X-Forwarded-Proto", "")
    return trust_forwarded_proto and forwarded.split(",")[-1].strip().lower() == "https"


def set_session_cookie(
    request: web.Request, response: web.StreamResponse, value: str, trust_forwarded_proto: bool = False
) -> None:
    response.set_cookie(
        COOKIE,
        value,
        max_age=SESSION_SECONDS,
        path="/",
        httponly=True,
        samesite="Strict",
        secure=came_over_tls(request, trust_forwarded_proto),  # see docs/ops-console.md
    )

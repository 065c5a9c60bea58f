"""Sign-in to the ops console: the bearer token for scripts, a session cookie for people, CSRF tokens.

Sessions are stateless: the cookie is `<expires>.<nonce>.<signature>`, signed with a key derived from
OPS_TOKEN, so changing the token signs everyone out, and no session is stored anywhere. A form's CSRF
token is the session's nonce signed for that purpose: a page from another site can neither read it nor
make a POST carry it. Every comparison of a secret is constant-time (hmac.compare_digest).
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import secrets
import time
from dataclasses import dataclass

from aiohttp import web

from receiver.logs import log

COOKIE = "igr_ops_session"
SESSION_SECONDS = 8 * 3600  # a working day; then sign in again
FAILED_SIGN_IN_DELAY_SECONDS = 1.0


@dataclass(frozen=True)
class Session:
    nonce: str
    expires: int


class Authenticator:
    """Checks the bearer token and session cookies, and makes sessions and CSRF tokens."""

    def __init__(self, token: str, failure_delay: float = FAILED_SIGN_IN_DELAY_SECONDS) -> None:
        self._token = token.encode()
        self._key = hmac.new(self._token, b"intergiro-receiver ops session", hashlib.sha256).digest()
        self.failure_delay = failure_delay
        self._failures = asyncio.Lock()

    def token_matches(self, given: str) -> bool:
        return hmac.compare_digest(given.encode(), self._token)

    def bearer_matches(self, request: web.Request) -> bool:
        scheme, _, given = request.headers.get("Authorization", "").partition(" ")
        return scheme.lower() == "bearer" and self.token_matches(given.strip())

    def _sign(self, purpose: str, text: str) -> str:
        return hmac.new(self._key, f"{purpose}:{text}".encode(), hashlib.sha256).hexdigest()

    def new_session(self) -> tuple[str, Session]:
        """A new session and its cookie value."""
        session = Session(secrets.token_urlsafe(18), int(time.time()) + SESSION_SECONDS)
        text = f"{session.expires}.{session.nonce}"
        return f"{text}.{self._sign('session', text)}", session

    def session(self, request: web.Request) -> Session | None:
        """The request's session, when its cookie is ours, intact and not expired."""
        expires, _, rest = request.cookies.get(COOKIE, "").partition(".")
        nonce, _, signature = rest.partition(".")
        if not (expires.isdigit() and nonce and signature):
            return None
        if not hmac.compare_digest(signature, self._sign("session", f"{expires}.{nonce}")):
            return None
        if int(expires) < time.time():
            return None
        return Session(nonce, int(expires))

    def csrf_token(self, session: Session) -> str:
        return self._sign("csrf", session.nonce)

    def csrf_matches(self, session: Session, given: str) -> bool:
        return hmac.compare_digest(given.encode(), self.csrf_token(session).encode())

    async def refuse(self, request: web.Request, what: str) -> None:
        """A failed sign-in: logged (never what was sent), and slowed; failures wait in turn, so
        guessing runs at most one try per FAILED_SIGN_IN_DELAY_SECONDS per process."""
        log.warning("ops sign-in refused", what=what, remote=request.remote, path=request.path)
        async with self._failures:
            await asyncio.sleep(self.failure_delay)


def set_session_cookie(request: web.Request, response: web.StreamResponse, value: str) -> None:
    response.set_cookie(
        COOKIE,
        value,
        max_age=SESSION_SECONDS,
        path="/",
        httponly=True,
        samesite="Strict",
        secure=request.secure,  # over TLS (a proxy in front terminating TLS: see docs/ops-console.md)
    )

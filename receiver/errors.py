"""The few exceptions of the package: a rejected callback maps to exactly one HTTP answer."""

from __future__ import annotations

# Text that came from a client or from Intergiro (an `alg`, a type, a redirect's Location) is cut to this
# many characters before it goes into a log line or an answer: a 190,000-character `alg` must not be
# echoed back whole.
MAX_QUOTED_CHARS = 200


def clip(text: str, limit: int = MAX_QUOTED_CHARS) -> str:
    """`text` cut to `limit` characters, marked when it was cut."""
    return text if len(text) <= limit else f"{text[:limit]}...({len(text) - limit} more)"


class ConfigError(Exception):
    """Settings that cannot work: one line per problem, each naming its variable."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("; ".join(problems))
        self.problems = problems


class CallbackRejected(Exception):
    """A callback that is not stored; `status` is the HTTP answer, `reason` is safe to show the sender."""

    status = 400
    error = "bad request"

    def __init__(self, reason: str) -> None:
        reason = clip(reason)
        super().__init__(reason)
        self.reason = reason


class BadCallback(CallbackRejected):
    """The body is not a JWT, not JSON, or not an order."""

    status = 400
    error = "bad request"


class NotTrusted(CallbackRejected):
    """Signature, algorithm, issuer or audience not acceptable, or remote verification refused it."""

    status = 401
    error = "not authorized"


class BodyTooLarge(CallbackRejected):
    status = 413
    error = "payload too large"


class BodyTimeout(CallbackRejected):
    """The body did not arrive in time (a slow or stalled client): answered, then the connection closed."""

    status = 408
    error = "request timeout"


class UnsupportedMediaType(CallbackRejected):
    status = 415
    error = "unsupported media type"


class Unavailable(CallbackRejected):
    """Redis or the remote verify endpoint cannot be reached: nothing was stored, the sender should retry."""

    status = 503
    error = "unavailable"

    def __init__(self, reason: str, retry_after: int = 5) -> None:
        super().__init__(reason)
        self.retry_after = retry_after

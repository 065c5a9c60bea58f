"""The package's exception root, its errors of configuration, commands and callbacks, and the one
format a command's error is printed in.

Every exception class of receiver/ and workers/ derives from `IntergiroReceiverError`, keeping a
builtin base where callers catch that (ValueError, RedisError). The tree, drawn once
(tests/test_errors.py holds it against the real classes):

    IntergiroReceiverError
     +-- ConfigError ............... receiver.errors: settings that cannot work; one line per variable, exit 1
     +-- CommandError .............. receiver.errors: a command that cannot do what it was asked; exit code
     |    +-- DevError ............. receiver.tools.dev: `dev` cannot start
     +-- CallbackRejected .......... receiver.errors: a callback not stored; exactly one HTTP answer
     |    +-- BadCallback .......... receiver.errors: 400
     |    +-- NotTrusted ........... receiver.errors: 401
     |    |    +-- NoKeyVerifies ... receiver.verify: no local key verifies (may fall back to remote)
     |    +-- BodyTooLarge ......... receiver.errors: 413
     |    +-- BodyTimeout .......... receiver.errors: 408
     |    +-- UnsupportedMediaType . receiver.errors: 415
     |    +-- Unavailable .......... receiver.errors: 503, Redis or Intergiro's API; the sender retries
     +-- DuplicateKey .............. receiver.verify: JSON naming a key twice (also a ValueError)
     +-- Unrepresentable ........... receiver.verify: JSON no update could carry (also a ValueError)
     +-- StatusError ............... receiver.status: amounts Intergiro's model cannot compute (also a ValueError)
     +-- NotReplicated ............. receiver.intake: stored, not yet on REDIS_MIN_REPLICAS (also a RedisError)
     +-- ApiFailed ................. receiver.intergiro_api: a call to Intergiro's API failed
     |    +-- ApiRefused ........... receiver.intergiro_api: 401/403
     |    +-- AnswerTooLarge ....... receiver.intergiro_api: an answer beyond its bound
     +-- DestinationNotConfigured .. receiver.deadletters: a requeue refused (409 in the ops API)
     +-- Stopped ................... receiver.replay: a replay asked to stop before the end of its window
     +-- LoggedOutcome ............. receiver.logs: an outcome we log; a library's record of it is left out
     |    +-- DeadLettered ......... workers.delivery: the update is in the dead-letter queue
     +-- DeliveryError ............. receiver.handler_errors: a failed attempt, retried (public)
     |    +-- PermanentDeliveryError receiver.handler_errors: dead-lettered at once (public)
     |    +-- PostFailed ........... workers.merchant_http: no readable answer to the POST
     +-- TargetNotConfigured ....... workers.delivery: no URL or handler, or a handler that cannot be imported
     +-- AnswerError ............... workers.merchant_http: an unreadable answer, inside; it leaves as PostFailed

Errors of a command are printed on stderr as `intergiro-receiver COMMAND: MESSAGE`, one line each
(`report`); `receiver.cli.main` prints a CommandError or a ConfigError that way and exits with its
code. (`check` is the exception: what it finds is its output, on stdout.)
"""

from __future__ import annotations

# Text that came from a client or from Intergiro (an `alg`, a type, a redirect's Location) is cut to this
# many characters before it goes into a log line or an answer: a 190,000-character `alg` must not be
# echoed back whole.
MAX_QUOTED_CHARS = 200


class IntergiroReceiverError(Exception):
    """The root of every exception this product raises: `except IntergiroReceiverError` catches ours
    and only ours."""


def clip(text: str, limit: int = MAX_QUOTED_CHARS) -> str:
    """`text` cut to `limit` characters, marked when it was cut."""
    return text if len(text) <= limit else f"{text[:limit]}...({len(text) - limit} more)"


class ConfigError(IntergiroReceiverError):
    """Settings that cannot work: one line per problem, each naming its variable."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("; ".join(problems))
        self.problems = problems


class CommandError(IntergiroReceiverError):
    """A command that cannot do what it was asked: each line is printed as `intergiro-receiver COMMAND:
    LINE` on stderr, and the command exits with `exit_code` (1: a problem; 2: a bad command line)."""

    def __init__(self, *lines: str, exit_code: int = 1) -> None:
        super().__init__("; ".join(lines))
        self.lines = lines
        self.exit_code = exit_code


def report(command: str, *lines: str) -> None:
    """Print a command's error lines in the one format every command uses."""
    import sys

    for line in lines:
        print(f"intergiro-receiver {command}: {line}", file=sys.stderr)


class CallbackRejected(IntergiroReceiverError):
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

"""The exceptions a merchant's handler (MERCHANT_HANDLER, DESTINATION_<NAME>_HANDLER) raises: its public
API, named in docs/update-v1.md.

    from receiver.handler_errors import PermanentDeliveryError

    def handle(update: dict) -> None:
        if not known(update["order_id"]):
            raise PermanentDeliveryError("unknown order number")  # dead-lettered at once

Any other exception of a handler is a failed attempt, retried on the destination's schedule;
`DeliveryError(message, retry_after=seconds)` asks for the next attempt no sooner than that (up to
an hour: receiver/retries.py). The
workers raise the same classes for a webhook's failures. (`workers.delivery.PermanentDeliveryError`,
where they were first, still names them.)
"""

from __future__ import annotations

from typing import Protocol

from receiver.errors import IntergiroReceiverError


class MerchantAnswer(Protocol):
    """What a failed attempt keeps of the merchant's answer (workers.merchant_http.Answer)."""

    @property
    def status(self) -> int: ...

    @property
    def retry_after(self) -> str | None: ...

    @property
    def content_type(self) -> str | None: ...

    @property
    def body_start(self) -> bytes: ...


class DeliveryError(IntergiroReceiverError):
    """A failed delivery attempt; `retryable` says whether another attempt may succeed."""

    retryable = True

    def __init__(
        self,
        message: str,
        retry_after: float | None = None,
        http_status: int | None = None,
        answer: MerchantAnswer | None = None,
        unreachable: bool = False,
    ) -> None:
        super().__init__(message)
        self.retry_after = retry_after
        self.http_status = http_status
        self.answer = answer  # the merchant's, when it answered
        self.unreachable = unreachable  # says the destination is down (its breaker counts it)


class PermanentDeliveryError(DeliveryError):
    """Raise from a handler to dead-letter the update at once instead of retrying it."""

    retryable = False

"""Intergiro's API, as this product calls it: remote verification of a callback, the order list (paged,
retried, bounded), and their errors. Used by the receiver (`app`), `reconcile` and `check`.

Every call is bounded: it follows no redirect (the API key and the card token inside a callback go to
INTERGIRO_API_URL's own origin only), it reads at most a fixed number of bytes of an answer (streamed,
so a 300 MiB answer is never held in memory), and in the receiver at most INTERGIRO_API_CONCURRENCY
calls are in flight at once: past that a callback is answered 503 at once, so a flood of junk sent
for remote verification cannot starve honest callbacks.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import re
import time
from collections.abc import AsyncGenerator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from typing import Any
from urllib.parse import urljoin, urlsplit

import aiohttp
import orjson

from receiver.errors import BadCallback, IntergiroReceiverError, NotTrusted, Unavailable, clip
from receiver.logs import log
from receiver.retry_after import parse_retry_after
from receiver.settings import Settings
from receiver.verify import (
    Unrepresentable,
    Verified,
    check_claims,
    read_trusted,
    repair_unwritable,
    strict_json,
    unverified_claims,
)

VERIFY_PATH = "/v1/worker-order/order/verify"
ORDER_LIST_PATH = "/v1/order"
# The most of an answer that is read: a verify answer is one order (a few KiB), a page of the order
# list at most a day's orders. Past these the call fails as an API failure.
MAX_VERIFY_ANSWER_BYTES = 1024 * 1024
MAX_ORDER_PAGE_BYTES = 32 * 1024 * 1024
# A paged answer may name its list and its continuation in any of these fields.
PAGE_LIST_FIELDS = ("orders", "data", "items", "results", "list")
PAGE_NEXT_FIELDS = ("next", "continuation", "cursor")
MAX_PAGES_PER_DAY = 10_000
# Pages of its creation day read to confirm one unsigned JSON order before the receiver gives up (503).
MAX_CONFIRM_PAGES = 100
# Confirming unsigned JSON orders (which anyone can post) is bounded: one read of a day's list at a time
# per process, and an id not in a complete read of its day that ended less than this long ago is not
# found without asking again (a negative answer only: a listed order is always read afresh). At most
# CONFIRM_DAYS_REMEMBERED days' ids are kept, and at most INTERGIRO_API_CONCURRENCY unsigned orders wait
# for one day's read (past that: 503 at once).
CONFIRM_NOT_FOUND_SECONDS = 10.0
CONFIRM_DAYS_REMEMBERED = 8
RETRY_STATUSES = frozenset({408, 429})
_ORDER_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")
# Twenty digits or more not part of a fraction or an exponent: perhaps an integer beyond 64 bits.
_LONG_INTEGER = re.compile(rb"(?<![.\deE+-])-?\d{20,}(?![.\deE])")


class ApiFailed(IntergiroReceiverError):
    """A call to Intergiro's API gave no usable answer (after retries); safe to try again later."""


class ApiRefused(ApiFailed):
    """401/403: the key is wrong or lacks the right; retrying cannot help."""


class AnswerTooLarge(ApiFailed):
    """The answer is longer than the bound for its kind: not read on."""


def verify_url(api_url: str) -> str:
    """Intergiro's verify endpoint under INTERGIRO_API_URL."""
    return api_url.rstrip("/") + VERIFY_PATH


def order_id_of(raw: Any) -> str | None:
    """The order's id when it looks like one: the only thing of an untrusted order ever logged."""
    order_id = raw.get("id") if isinstance(raw, dict) else None
    return order_id if isinstance(order_id, str) and _ORDER_ID.fullmatch(order_id) else None


def new_session(settings: Settings) -> aiohttp.ClientSession:
    """The HTTP client for Intergiro's API: at most INTERGIRO_API_CONCURRENCY connections, and answers
    read as sent (no automatic decompression, which could turn a small answer into a huge one)."""
    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=settings.intergiro_api_concurrency),
        auto_decompress=False,
        headers={"Accept-Encoding": "identity"},
    )


async def read_bounded(answer: aiohttp.ClientResponse, limit: int) -> bytes:
    """The answer's body, streamed; AnswerTooLarge (and the connection dropped) past `limit` bytes."""
    if answer.headers.get("Content-Encoding", "identity").lower() != "identity":
        answer.close()
        raise ApiFailed(f"the answer is encoded ({clip(answer.headers['Content-Encoding'], 40)})")
    if answer.content_length is not None and answer.content_length > limit:
        answer.close()
        raise AnswerTooLarge(f"the answer is larger than {limit} bytes")
    chunks: list[bytes] = []
    size = 0
    async for chunk in answer.content.iter_any():
        size += len(chunk)
        if size > limit:
            answer.close()
            raise AnswerTooLarge(f"the answer is larger than {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


@dataclass(frozen=True)
class RetryPolicy:
    """How one API request is retried on 408, 429, 5xx, timeouts and connection errors."""

    attempts: int = 4
    backoff_seconds: float = 1.0
    max_delay_seconds: float = 60.0
    sleep: Callable[[float], Awaitable[Any]] = asyncio.sleep

    def delay(self, attempt: int, retry_after: float | None) -> float:
        wanted = retry_after if retry_after is not None else self.backoff_seconds * 2 ** (attempt - 1)
        return min(max(wanted, 0.0), self.max_delay_seconds)


NO_RETRY = RetryPolicy(attempts=1)


class OrderApi:
    """Intergiro's `GET /v1/order?start=&end=`, paged and retried; yields pages of raw orders."""

    def __init__(
        self,
        session: aiohttp.ClientSession,
        settings: Settings,
        retry: RetryPolicy | None = None,
        *,
        max_page_bytes: int = MAX_ORDER_PAGE_BYTES,
    ) -> None:
        self.session = session
        self.base = settings.intergiro_api_url.rstrip("/")
        self.origin = urlsplit(self.base)[:2]
        self.headers = {
            "Accept": "application/json",
            "Authorization": f"Bearer {settings.intergiro_api_key}",
        }
        self.timeout = aiohttp.ClientTimeout(total=settings.intergiro_api_timeout_seconds)
        self.retry = retry or RetryPolicy()
        self.max_page_bytes = max_page_bytes

    async def pages(self, day: date) -> AsyncGenerator[list[Any], None]:
        """The orders created on `day`, page by page, following `next`/continuation or a `Link` header."""
        query = {"start": day.isoformat(), "end": (day + timedelta(days=1)).isoformat()}
        url: str = self.base + ORDER_LIST_PATH
        params: dict[str, str] | None = query
        asked: set[tuple[str, str]] = set()
        for _ in range(MAX_PAGES_PER_DAY):
            request_key = (url, repr(sorted((params or {}).items())))
            if request_key in asked:
                raise ApiFailed("the order list's next page points back to a page already read")
            asked.add(request_key)
            body, link_next = await self._get(url, params)
            orders, continuation = self._page(body)
            yield orders
            if link_next is not None:
                url, params = self._same_origin(link_next), None
            elif continuation is None:
                return
            elif continuation.startswith(("http://", "https://", "/")):
                url, params = self._same_origin(continuation), None
            else:
                url, params = self.base + ORDER_LIST_PATH, {**query, "continuation": continuation}
        raise ApiFailed(f"the order list of {day} has more than {MAX_PAGES_PER_DAY} pages")

    async def find(
        self, order_id: str, day: date, max_pages: int = MAX_CONFIRM_PAGES, listed: set[str] | None = None
    ) -> dict[str, Any] | None:
        """The order `order_id` as the list of `day` holds it; None when it is not there (then
        `listed`, when given, holds the id of every order the list holds)."""
        read = 0
        async with contextlib.aclosing(self.pages(day)) as pages:
            async for page in pages:
                for raw in page:
                    if isinstance(raw, dict) and raw.get("id") == order_id:
                        return raw
                    if listed is not None and (listed_id := order_id_of(raw)) is not None:
                        listed.add(listed_id)
                read += 1
                if read >= max_pages:
                    raise ApiFailed(f"order not found in the first {max_pages} pages of {day}")
        return None

    def _same_origin(self, link: str) -> str:
        """The API key is sent only to INTERGIRO_API_URL's own origin, whatever a next link says."""
        url = urljoin(self.base + "/", link)
        if urlsplit(url)[:2] != self.origin:
            raise ApiFailed("the order list's next page is on another host; not following it")
        return url

    @staticmethod
    def _page(body: Any) -> tuple[list[Any], str | None]:
        if isinstance(body, list):
            return body, None
        if isinstance(body, dict):
            for name in PAGE_LIST_FIELDS:
                if isinstance(body.get(name), list):
                    continuation = next(
                        (body[n] for n in PAGE_NEXT_FIELDS if isinstance(body.get(n), str) and body[n]), None
                    )
                    return body[name], continuation
        raise ApiFailed("the order list is not a JSON list of orders")

    @staticmethod
    def _parse(raw: bytes) -> Any:
        """orjson, or the standard library for the JSON orjson refuses (a lone surrogate, an integer
        beyond 64 bits): one such order must not make the whole page unreadable."""
        try:
            value = orjson.loads(raw)
        except orjson.JSONDecodeError:
            pass
        else:  # orjson reads an integer beyond 64 bits as a float: such a page is read exactly
            if _LONG_INTEGER.search(raw) is None:
                return value
        try:  # what no update can carry (NaN too) is left for each order's own repair_unwritable
            return strict_json(raw, writable=False)
        except (ValueError, UnicodeDecodeError, RecursionError):
            raise ApiFailed(f"GET {ORDER_LIST_PATH} did not answer JSON") from None

    async def _get(self, url: str, params: dict[str, str] | None) -> tuple[Any, str | None]:
        problem = ""
        for attempt in range(1, self.retry.attempts + 1):
            retry_after: float | None = None
            try:
                async with self.session.get(
                    url, params=params, headers=self.headers, timeout=self.timeout, allow_redirects=False
                ) as answer:
                    if answer.status in (401, 403):
                        raise ApiRefused(
                            f"Intergiro refused INTERGIRO_API_KEY ({answer.status}) listing orders; "
                            "check the key and its rights"
                        )
                    if answer.status in RETRY_STATUSES or answer.status >= 500:
                        problem = f"answered {answer.status}"
                        retry_after = parse_retry_after(answer.headers.get("Retry-After"))
                    elif answer.status != 200:
                        raise ApiFailed(f"GET {ORDER_LIST_PATH} answered {answer.status}")
                    else:
                        try:
                            raw = await read_bounded(answer, self.max_page_bytes)
                        except ApiFailed as exc:  # as large the next time: not retried
                            raise ApiFailed(f"GET {ORDER_LIST_PATH}: {exc}") from None
                        link = answer.links.get("next")
                        return self._parse(raw), str(link["url"]) if link and link.get("url") else None
            except (aiohttp.ClientError, TimeoutError) as exc:
                problem = f"{type(exc).__name__}"
            if attempt == self.retry.attempts:
                break
            delay = self.retry.delay(attempt, retry_after)
            log.warning("intergiro api retry", path=ORDER_LIST_PATH, problem=problem, delay=delay)
            await self.retry.sleep(delay)
        raise ApiFailed(f"GET {ORDER_LIST_PATH} failed after {self.retry.attempts} attempts ({problem})")


@dataclass
class _DayList:
    """What the receiver knows of one day's order list while confirming unsigned orders: the one read
    of it at a time, who waits for it, and the ids of its last complete read."""

    reading: asyncio.Lock = field(default_factory=asyncio.Lock)
    waiting: int = 0
    listed: frozenset[str] = frozenset()
    read_at: float = -math.inf

    def not_listed(self, order_id: str, now: float) -> bool:
        """Whether a complete read less than CONFIRM_NOT_FOUND_SECONDS old did not hold `order_id`."""
        return now - self.read_at < CONFIRM_NOT_FOUND_SECONDS and order_id not in self.listed


class IntergiroApi:
    """The receiver's client of Intergiro's API: its own bounded connection pool, and a cap on calls
    in flight (beyond it a callback is answered 503 at once rather than queued behind a flood)."""

    def __init__(self, settings: Settings, session: aiohttp.ClientSession | None = None) -> None:
        self.settings = settings
        self.session = session or new_session(settings)
        self.concurrency = settings.intergiro_api_concurrency
        self.in_flight = 0
        self.url = verify_url(settings.intergiro_api_url)
        self.headers = {"Accept": "application/json", "Authorization": f"Bearer {settings.intergiro_api_key}"}
        self.timeout_seconds = settings.intergiro_api_timeout_seconds
        self.orders = OrderApi(self.session, settings, NO_RETRY)  # Intergiro retries the callback itself
        self._days: dict[date, _DayList] = {}

    async def close(self) -> None:
        await self.session.close()

    @contextlib.contextmanager
    def _slot(self) -> Iterator[None]:
        if self.in_flight >= self.concurrency:
            raise Unavailable(f"{self.concurrency} calls to Intergiro's API are in flight; try again later")
        self.in_flight += 1
        try:
            yield
        finally:
            self.in_flight -= 1

    async def verify_token(self, token: bytes) -> Verified:
        """Ask Intergiro's verify endpoint about a token; its order is trusted only when it is the token's.

        The token must be a well-formed JWS (else BadCallback, and nothing is sent) whose unverified
        claims name an order id, our issuer and audience (else NotTrusted, as local verification would:
        Intergiro vouches for a signature, not for the token being meant for us)."""
        claims = unverified_claims(token)
        claimed_id = order_id_of(claims)
        if claimed_id is None:
            raise BadCallback("token payload has no order id")
        check_claims(claims, self.settings.expected_audience)
        with self._slot():
            order, repaired = await self._post_verify(token)
        answered_id = order.get("id")
        if answered_id != claimed_id:
            log.warning(
                "verify endpoint answered another order than the token's",
                token_order=claimed_id,
                answered_order=clip(str(answered_id), 80),
            )
            raise NotTrusted("the verified order is not the token's order")
        return Verified(order=order, verified_by="remote", repaired=repaired)

    @staticmethod
    def _not_listed(order_id: str, day: date) -> NotTrusted:
        log.warning("unsigned order not in Intergiro's order list", order=order_id, day=day.isoformat())
        return NotTrusted("Intergiro's order list does not hold this order")

    def _day_list(self, day: date) -> _DayList:
        """The day's list state; days neither read nor waited for are forgotten, oldest first, past
        CONFIRM_DAYS_REMEMBERED (the others are at most one per call to Intergiro in flight)."""
        known = self._days.get(day)
        if known is not None:
            return known
        if len(self._days) >= CONFIRM_DAYS_REMEMBERED:
            idle = [d for d, state in self._days.items() if not state.waiting]
            for old in idle[: len(self._days) - CONFIRM_DAYS_REMEMBERED + 1]:
                del self._days[old]
        self._days[day] = _DayList()
        return self._days[day]

    async def _post_verify(self, token: bytes) -> tuple[dict[str, Any], tuple[str, ...]]:
        """The order Intergiro's verify endpoint answers for `token`, and its places repaired."""
        headers = {**self.headers, "Content-Type": "application/jwt"}
        try:
            async with self.session.post(
                self.url,
                data=token,
                headers=headers,
                timeout=aiohttp.ClientTimeout(total=self.timeout_seconds),
                allow_redirects=False,
            ) as answer:
                status = answer.status
                if 300 <= status < 400:
                    location = clip(answer.headers.get("Location", ""), 120)
                    log.warning("verify endpoint redirected; not followed", status=status, location=location)
                    raise Unavailable(f"verify endpoint answered a redirect ({status}); not followed")
                if status >= 500 or status in RETRY_STATUSES:
                    raise Unavailable(f"verify endpoint answered {status}")
                if status >= 400:
                    raise NotTrusted(f"verify endpoint refused the callback ({status})")
                if status != 200:
                    raise Unavailable(f"verify endpoint answered {status}")
                try:
                    text = await read_bounded(answer, MAX_VERIFY_ANSWER_BYTES)
                except ApiFailed as exc:
                    log.warning("verify endpoint answer refused", problem=str(exc))
                    raise Unavailable(f"verify endpoint: {exc}") from None
        except (TimeoutError, aiohttp.ClientError, OSError):
            raise Unavailable("verify endpoint not reachable") from None
        try:
            order, repaired = read_trusted(text)
        except Unrepresentable as exc:  # Intergiro's own order, which no update could carry
            raise BadCallback(f"verified order: {exc}") from None
        except (ValueError, UnicodeDecodeError, RecursionError):
            raise Unavailable("verify endpoint answered something that is not JSON") from None
        if not isinstance(order, dict):
            raise Unavailable("verify endpoint answered something that is not an order")
        return order, repaired

    async def confirm_order(self, unsigned: Any) -> Verified:
        """An unsigned JSON order, confirmed by Intergiro's order list of its creation day (as
        reconcile reads it): what is trusted, and queued, is the API's order, never the body. Anyone
        can post one, so the reads are bounded (see CONFIRM_NOT_FOUND_SECONDS)."""
        order_id = order_id_of(unsigned)
        created = unsigned.get("created") if isinstance(unsigned, dict) else None
        if order_id is None:
            raise BadCallback("order has no id")
        try:
            day = date.fromisoformat(created[:10]) if isinstance(created, str) else None
        except ValueError:
            day = None
        if day is None:
            raise BadCallback("order has no creation date (created)")
        if day > datetime.now(UTC).date() + timedelta(days=1):  # no list holds it (9999-12-31 included)
            raise BadCallback("order creation date (created) is in the future")
        day_list = self._day_list(day)
        if day_list.not_listed(order_id, time.monotonic()):
            raise self._not_listed(order_id, day)
        if day_list.waiting >= self.concurrency:
            raise Unavailable(f"{self.concurrency} unsigned orders wait for the order list of that day")
        day_list.waiting += 1
        try:
            async with asyncio.timeout(self.timeout_seconds), day_list.reading:
                if day_list.not_listed(order_id, time.monotonic()):  # read while this one waited
                    raise self._not_listed(order_id, day)
                listed: set[str] = set()
                with self._slot():
                    order = await self.orders.find(order_id, day, listed=listed)
                if order is None:
                    day_list.listed, day_list.read_at = frozenset(listed), time.monotonic()
        except ApiRefused as exc:
            log.error("order list refused INTERGIRO_API_KEY", problem=str(exc))
            raise Unavailable("order list not readable") from None
        except ApiFailed as exc:
            log.warning("order list not readable", problem=str(exc))
            raise Unavailable("order list not readable") from None
        except TimeoutError:
            raise Unavailable("order list not readable in time") from None
        finally:
            day_list.waiting -= 1
        if order is None:
            raise self._not_listed(order_id, day)
        try:
            order, repaired = repair_unwritable(order)
        except Unrepresentable as exc:  # Intergiro's own order, which no update could carry
            raise BadCallback(f"listed order: {exc}") from None
        return Verified(order=order, verified_by="remote", repaired=repaired)

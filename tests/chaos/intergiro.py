"""Intergiro's side of the chaos run: progressive callbacks signed with RS256, replays of callbacks
already sent, and a sender that retries any non-200 (connection refused or reset included) with
backoff until it gets 200, as Intergiro does."""

from __future__ import annotations

import asyncio
import random
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp

from tests.helpers import JWT, card_order, token

EVENTS = ("order", "charge", "refund")


@dataclass(frozen=True)
class Callback:
    order_id: str
    events: int  # how many events of the order's story it carries (its newest is events - 1)
    body: bytes
    replay: bool = False

    @property
    def update_id(self) -> str:
        """The update of the event this callback brought first."""
        return f"{self.order_id}-{self.events - 1}-{EVENTS[self.events - 1]}"


def plan_callbacks(orders: list[str], key: Any, replays: int, rng: random.Random) -> list[Callback]:
    """Every order's story as progressive callbacks ([order], [order, charge], [order, charge, refund]),
    orders interleaved, plus `replays` callbacks sent again some time after their first sending."""
    timed: list[tuple[float, Callback]] = []
    for order_id in orders:
        moments = sorted(rng.random() for _ in EVENTS)
        for count, moment in enumerate(moments, start=1):
            body = token(card_order(order_id, EVENTS[:count]), key)
            timed.append((moment, Callback(order_id, count, body)))
    for moment, callback in rng.sample(timed, replays):
        replay = Callback(callback.order_id, callback.events, callback.body, replay=True)
        timed.append((rng.uniform(moment, 1.0), replay))
    timed.sort(key=lambda pair: pair[0])
    return [callback for _, callback in timed]


@dataclass
class Sender:
    """Posts callbacks with `concurrency` in flight; each is retried until answered 200."""

    url: str
    concurrency: int = 24
    deadline_seconds: float = 180.0
    rng: random.Random = field(default_factory=lambda: random.Random(6))
    sent: int = 0  # callbacks answered 200
    attempts: int = 0
    refusals: Counter[str] = field(default_factory=Counter)  # non-200 answers and connection errors
    outcomes: Counter[str] = field(default_factory=Counter)  # accepted / duplicate
    queued: Counter[str] = field(default_factory=Counter)  # update id -> times a 200 said it was queued

    async def send_all(self, callbacks: list[Callback], on_progress: Callable[[int], None]) -> None:
        deadline = time.monotonic() + self.deadline_seconds
        pending = iter(callbacks)
        connector = aiohttp.TCPConnector(limit=self.concurrency)
        async with aiohttp.ClientSession(connector=connector) as session:

            async def lane() -> None:
                for callback in pending:  # the lanes share one iterator: each callback is sent once
                    await self.send(session, callback, deadline)
                    on_progress(self.sent)

            await asyncio.gather(*(lane() for _ in range(self.concurrency)))

    async def send(self, session: aiohttp.ClientSession, callback: Callback, deadline: float) -> None:
        failures = 0
        while True:
            self.attempts += 1
            try:
                timeout = aiohttp.ClientTimeout(total=10)
                async with session.post(self.url, data=callback.body, headers=JWT, timeout=timeout) as answer:
                    payload = await answer.json(content_type=None) if answer.status == 200 else None
                    if payload is not None:
                        self.sent += 1
                        self.outcomes[payload["status"]] += 1
                        self.queued.update(payload.get("queued", []))
                        return
                    self.refusals[f"HTTP {answer.status}"] += 1
            except (aiohttp.ClientError, TimeoutError) as exc:
                self.refusals[type(exc).__name__] += 1
            if time.monotonic() > deadline:
                raise AssertionError(f"{callback.update_id}: no 200 before the sender's deadline")
            failures += 1
            await asyncio.sleep(self.rng.uniform(0, min(1.0, 0.02 * 2**failures)))

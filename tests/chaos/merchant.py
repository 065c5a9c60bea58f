"""The merchant's side of the chaos run: an idempotent webhook endpoint (a real aiohttp server) that
records every POST, applies each `Idempotency-Key` once, and answers 400 or 500 when told to."""

from __future__ import annotations

import asyncio
import json
import random
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field

from aiohttp import web
from standardwebhooks.webhooks import Webhook, WebhookVerificationError


@dataclass
class Post:
    """One POST as the merchant saw it: which worker sent it (its URL path), and what it answered."""

    at: float
    key: str
    order_id: str
    sequence: int
    worker: str
    status: int = 0
    answered_at: float = 0.0
    applied: bool = False


@dataclass
class IdempotentMerchant:
    """Applies each update once by `Idempotency-Key` (later POSTs of a key are answered 200 and change
    nothing); answers 400 to every POST of `refuse` and 500 to a `flaky_rate` share of first and second
    attempts. `slow_next(worker)` makes that worker's next POST take `slow_seconds` and sets an event
    when it starts, so a kill can land mid-delivery."""

    secret: str
    refuse: set[str] = field(default_factory=set)
    flaky_rate: float = 0.0
    slow_seconds: float = 1.5
    seed: int = 6
    posts: list[Post] = field(default_factory=list)
    applied: dict[str, float] = field(default_factory=dict)
    applied_by_order: dict[str, list[int]] = field(default_factory=lambda: defaultdict(list))
    attempts: Counter[str] = field(default_factory=Counter)
    bad_signatures: int = 0
    out_of_order: list[Post] = field(default_factory=list)
    _slow: dict[str, asyncio.Event] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.rng = random.Random(self.seed)
        self.verifier = Webhook(self.secret)

    def slow_next(self, worker: str) -> asyncio.Event:
        self._slow[worker] = event = asyncio.Event()
        return event

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/hooks/{worker}", self.receive)
        return app

    async def receive(self, request: web.Request) -> web.Response:
        body = await request.read()
        try:
            update = self.verifier.verify(body, dict(request.headers))
        except WebhookVerificationError:
            self.bad_signatures += 1
            return web.Response(status=400, text="bad signature")
        key = request.headers["Idempotency-Key"]
        post = Post(
            time.time(), key, update["order_id"], update["event"]["sequence"], request.match_info["worker"]
        )
        self.posts.append(post)
        self.attempts[key] += 1
        done = self.applied_by_order[post.order_id]
        if done and post.sequence < done[-1]:
            self.out_of_order.append(post)  # a lower sequence after a higher one was applied
        post.status = self._answer(post)
        slow = self._slow.pop(post.worker, None) if post.status == 200 else None
        if slow is not None:  # a refused or failing POST leaves the next one to be the slow one
            slow.set()
            await asyncio.sleep(self.slow_seconds)
        if post.status == 200 and key not in self.applied:
            self.applied[key] = time.time()
            done.append(post.sequence)
            post.applied = True
        post.answered_at = time.time()
        return web.Response(status=post.status, text=json.dumps({"applied": post.applied}))

    def _answer(self, post: Post) -> int:
        if post.key in self.refuse:
            return 400
        if (
            post.key not in self.applied
            and self.attempts[post.key] <= 2
            and self.rng.random() < self.flaky_rate
        ):
            return 500
        return 200

    def http_duplicates(self) -> dict[str, list[Post]]:
        """Keys the merchant answered 200 more than once (it applied them once: the rest were redeliveries)."""
        answered: dict[str, list[Post]] = defaultdict(list)
        for post in self.posts:
            if post.status == 200:
                answered[post.key].append(post)
        return {key: posts for key, posts in answered.items() if len(posts) > 1}

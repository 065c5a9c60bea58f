"""A merchant endpoint for the worker tests: a real aiohttp server that records every POST and answers
as the test tells it, and helpers to read what the workers logged."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiohttp import web

SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"


@dataclass
class Received:
    at: float
    headers: dict[str, str]
    body: bytes
    port: int = 0  # the client's, to tell connections apart

    @property
    def update(self) -> dict[str, Any]:
        return dict(json.loads(self.body))


@dataclass
class Sink:
    """`answer(update_id, attempt_number)` gives (status, headers, delay seconds) for each POST."""

    answer: Callable[[str, int], tuple[int, dict[str, str], float]] = lambda _id, _n: (200, {}, 0.0)
    received: list[Received] = field(default_factory=list)
    url: str = ""
    answer_body: bytes | None = None  # instead of "ok" / "no"
    open_now: int = 0  # requests received and not yet answered
    most_open: int = 0  # the most ever open at once

    def app(self) -> web.Application:
        async def post(request: web.Request) -> web.Response:
            body = await request.read()
            update_id = request.headers.get("webhook-id", "")
            peer = request.transport.get_extra_info("peername") if request.transport else None
            got = Received(time.time(), dict(request.headers), body, peer[1] if peer else 0)
            self.received.append(got)
            attempt = sum(1 for r in self.received if r.headers.get("webhook-id") == update_id)
            status, headers, delay = self.answer(update_id, attempt)
            self.open_now += 1
            self.most_open = max(self.most_open, self.open_now)
            try:
                if delay:
                    await asyncio.sleep(delay)
            finally:
                self.open_now -= 1
            if self.answer_body is not None:
                return web.Response(status=status, headers=headers, body=self.answer_body)
            return web.Response(status=status, headers=headers, text="ok" if status < 300 else "no")

        app = web.Application()
        app.router.add_post("/hooks", post)
        return app

    def attempts(self, update_id: str) -> list[Received]:
        return [r for r in self.received if r.headers.get("webhook-id") == update_id]


def log_events(log: Path, event: str) -> list[dict[str, Any]]:
    lines = []
    for line in log.read_text().splitlines():
        if line.startswith("{"):
            record = json.loads(line)
            if record.get("event") == event:
                lines.append(record)
    return lines


async def wait_for(condition: Callable[[], bool], seconds: float = 30.0, what: str = "condition") -> None:
    """Poll until `condition()` holds; fails (with `what`) after `seconds`, a guard against a hang."""
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {seconds:.0f} s waiting for {what}")
        await asyncio.sleep(0.05)


_DELIVERY_THREAD = ThreadPoolExecutor(1, thread_name_prefix="test-delivery")


async def in_delivery_thread(call: Callable[..., Any], *args: Any) -> Any:
    """`call(*args)` on the one thread kept for it, as a worker's delivery thread POSTs: a merchant
    connection is kept alive per thread (asyncio.to_thread may pick another thread each time)."""
    return await asyncio.get_running_loop().run_in_executor(_DELIVERY_THREAD, call, *args)

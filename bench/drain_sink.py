"""The merchant endpoint of bench/drain, in a process of its own (on uvloop): answers every POST 200, at
once or after the milliseconds given as its second argument (`bench/e2e --merchant-ms`).

It verifies no signature while the workers run (so it is not the bottleneck); it records every
delivery's `webhook-id` in arrival order with its receipt time (`time.monotonic()`, one clock for
every process on Linux: bench/e2e compares it with the sender's) and keeps every 50th request's headers and body, whose
Standard Webhooks signatures the bench checks after the run. `GET /received` hands that over and
forgets it for the next run.
"""

from __future__ import annotations

import asyncio
import sys
import time

import orjson
from aiohttp import web

from receiver.app import event_loop

SAMPLE_EVERY = 50


def make_app(answer_after: float = 0.0) -> web.Application:
    ids: list[str] = []
    times: list[float] = []
    samples: list[dict[str, str]] = []
    last_at = [0.0]  # when the last delivery arrived (Unix time): a destination's rate ends there

    async def hook(request: web.Request) -> web.Response:
        body = await request.read()
        times.append(time.monotonic())
        update_id = request.headers.get("webhook-id", "")
        ids.append(update_id)
        last_at[0] = time.time()
        if len(ids) % SAMPLE_EVERY == 1:
            samples.append(
                {"headers": {str(k): v for k, v in request.headers.items()}, "body": body.decode()}
            )
        if answer_after:  # a merchant's own work (a database write and the like) before its answer
            await asyncio.sleep(answer_after)
        return web.Response(status=200)

    async def received(request: web.Request) -> web.Response:
        answer = orjson.dumps({"ids": ids, "times": times, "samples": samples, "last_at": last_at[0]})
        ids.clear()
        times.clear()
        samples.clear()
        return web.Response(body=answer, content_type="application/json")

    app = web.Application()
    app.router.add_post("/hooks", hook)
    app.router.add_get("/received", received)
    return app


if __name__ == "__main__":
    # On the event loop our receiver runs on (uvloop): the sink stands in for the merchant's server, whose
    # CPU is not the workers' in production, but shares this machine's cores with them in the bench.
    web.run_app(
        make_app(float(sys.argv[2]) / 1000 if len(sys.argv) > 2 else 0.0),
        loop=event_loop(),
        host="127.0.0.1",
        port=int(sys.argv[1]),
        access_log=None,
        print=None,
    )

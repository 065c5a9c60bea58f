"""The straightforward receiver, kept as the baseline: what one would write first.

PyJWT `jwt.decode` (signature, issuer, audience), the same normalization as the real receiver, then in
a thread pool (`run_in_executor`, sync redis-py): per event `SET NX` a marker and, when new, RQ's
`Queue.enqueue`. `python -m bench.baseline PORT REDIS_URL PUBLIC_KEY.pem`
"""

from __future__ import annotations

import asyncio
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import jwt
import orjson
from aiohttp import web
from cryptography.hazmat.primitives import serialization
from redis import Redis
from rq import Queue
from rq.serializers import JSONSerializer

from receiver.order import build_updates, parse_order

DEDUP_TTL_SECONDS = 34_560_000


def store(queue: Queue, redis: Redis, updates: list[dict[str, Any]]) -> list[str]:
    queued = []
    for update in updates:
        if redis.set(f"baseline:seen:{update['id']}", 1, nx=True, ex=DEDUP_TTL_SECONDS):
            queue.enqueue("workers.jobs.deliver_update", update, job_id=update["id"], result_ttl=0)
            queued.append(update["id"])
    return queued


def create_app(redis_url: str, public_key_pem: bytes) -> web.Application:
    redis = Redis.from_url(redis_url)
    queue = Queue("order-updates", connection=redis, serializer=JSONSerializer)
    public_key = serialization.load_pem_public_key(public_key_pem)  # loaded once, not per call

    async def receive(request: web.Request) -> web.Response:
        token = (await request.read()).strip()
        try:
            claims = jwt.decode(
                token, public_key, algorithms=["RS256"], audience="production", issuer="payfunc"
            )
        except jwt.InvalidTokenError as exc:
            return web.json_response({"status": "rejected", "reason": str(exc)}, status=401)
        order = parse_order(claims)
        received_at = datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
        updates = build_updates(order, received_at=received_at, verified_by="local:bench")
        loop = asyncio.get_running_loop()
        queued = await loop.run_in_executor(None, store, queue, redis, updates)
        status = "accepted" if queued else "duplicate"
        return web.Response(
            body=orjson.dumps({"status": status, "order": order["id"], "queued": queued}),
            content_type="application/json",
        )

    app = web.Application(client_max_size=262_144)
    app.router.add_post("/callbacks/intergiro", receive)
    return app


def main() -> None:
    port, redis_url, key_path = sys.argv[1:4]
    app = create_app(redis_url, Path(key_path).read_bytes())
    web.run_app(app, host="127.0.0.1", port=int(port), access_log=None, print=None)


if __name__ == "__main__":
    main()

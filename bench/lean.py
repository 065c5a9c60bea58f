"""LAB BASELINE, NOT THE PRODUCT: the leanest honest receiver, bench/ingest's "lean path" row.

What any receiver of these callbacks has to do at the least, and nothing more: read the body, check its
RS256 signature (`cryptography`, against the one key, loaded once), read the claims (orjson), and store
the order's new events with one Lua call per callback (per event: a marker set if new, and for a new one
its job hash, holding the claims as they came, pushed on the queue; the keys the bench's queue check
reads). It checks no claim and no header, normalizes nothing, keeps no history, batches nothing, counts
and logs nothing, answers no 4xx with care: a floor for the receiver's work per callback, to quote the
receiver against in the same run (issue 27: "at least 0.7 of the lean path"). Never deploy it.

    python -m bench.lean PORT REDIS_URL PUBLIC_KEY.pem
"""

from __future__ import annotations

import sys
from pathlib import Path

import orjson
import pybase64
import uvloop
from aiohttp import web
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from redis.asyncio import Redis

DEDUP_TTL_SECONDS = 34_560_000
QUEUE = "rq:queue:order-updates"
# KEYS[1] the order's seen events, KEYS[2] the queue; ARGV[1] the job data, ARGV[2] the markers' time to
# live, then pairs of (event key, job id). One script: a marker is never written without its job.
STORE = """
local queued = {}
for i = 3, #ARGV, 2 do
  if redis.call('HSETNX', KEYS[1], ARGV[i], 1) == 1 then
    redis.call('HSET', 'rq:job:' .. ARGV[i + 1], 'data', ARGV[1], 'status', 'queued')
    redis.call('LPUSH', KEYS[2], ARGV[i + 1])
    queued[#queued + 1] = ARGV[i + 1]
  end
end
redis.call('EXPIRE', KEYS[1], ARGV[2])
return queued
"""
_PKCS1V15 = padding.PKCS1v15()
_SHA256 = hashes.SHA256()


def b64url(part: bytes) -> bytes:
    return pybase64.urlsafe_b64decode(part + b"=" * (-len(part) % 4))


def create_app(redis_url: str, public_key_pem: bytes) -> web.Application:
    key = serialization.load_pem_public_key(public_key_pem)
    assert isinstance(key, rsa.RSAPublicKey)
    redis = Redis.from_url(redis_url)
    store = redis.register_script(STORE)
    rejected = web.Response(status=401, body=b'{"status":"rejected"}', content_type="application/json")

    async def receive(request: web.Request) -> web.Response:
        token = (await request.read()).strip()
        signed, _, signature = token.rpartition(b".")
        try:
            key.verify(b64url(signature), signed, _PKCS1V15, _SHA256)
        except (InvalidSignature, ValueError):
            return rejected
        claims = b64url(signed.partition(b".")[2])
        order = orjson.loads(claims)
        order_id = order["id"]
        args: list[bytes | str | int] = [claims, DEDUP_TTL_SECONDS]
        for sequence, event in enumerate(order.get("event") or ()):
            args += (f"{sequence}:{event['type']}", f"{order_id}-{sequence}-{event['type']}")
        queued = [q.decode() for q in await store(keys=[f"lean:seen:{order_id}", QUEUE], args=args)]
        status = "accepted" if queued else "duplicate"
        return web.Response(
            body=orjson.dumps({"status": status, "order": order_id, "queued": queued}),
            content_type="application/json",
        )

    app = web.Application(client_max_size=262_144)
    app.router.add_post("/callbacks/intergiro", receive)
    return app


def main() -> None:
    port, redis_url, key_path = sys.argv[1:4]
    app = create_app(redis_url, Path(key_path).read_bytes())
    web.run_app(
        app, host="127.0.0.1", port=int(port), access_log=None, print=None, loop=uvloop.new_event_loop()
    )


if __name__ == "__main__":
    main()

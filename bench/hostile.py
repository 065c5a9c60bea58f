"""Valid-callback latency alone, then under a flood of forged tokens, in the same run.

Starts its own Redis and a real `intergiro-receiver serve` process, posts VALID callbacks one after
another (unique orders, signed with a key the receiver trusts) and measures each answer; then does the
same while FLOODERS concurrent clients post tokens signed with a key nobody trusts (each costs the
receiver a full RS256 verification before its 401). Prints p50/p99 of both phases and their ratio.

    .venv/bin/python bench/hostile.py [--valid 200] [--flooders 16]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import aiohttp
from cryptography.hazmat.primitives.asymmetric import rsa

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.conftest import pem_public
from tests.helpers import JWT, card_order, token
from tests.processes import RedisServer, free_port, serve_env, start_server, stop


def percentile(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1] if len(values) > 1 else values[0]


async def valid_latencies(url: str, key: rsa.RSAPrivateKey, prefix: str, count: int) -> list[float]:
    bodies = [token(card_order(f"{prefix}{n:010d}"), key) for n in range(count)]
    latencies = []
    async with aiohttp.ClientSession() as session:
        for body in bodies:
            started = time.perf_counter()
            async with session.post(url, data=body, headers=JWT) as answer:
                await answer.read()
                assert answer.status == 200, answer.status
            latencies.append(time.perf_counter() - started)
    return latencies


async def flood(url: str, body: bytes, stop: asyncio.Event, counts: list[int]) -> None:
    async with aiohttp.ClientSession() as session:
        while not stop.is_set():
            async with session.post(url, data=body, headers=JWT) as answer:
                await answer.read()
                assert answer.status == 401, answer.status
            counts.append(1)


async def run(url: str, trusted: rsa.RSAPrivateKey, valid: int, flooders: int) -> None:
    alone = await valid_latencies(url, trusted, "Alone-", valid)
    forged = token(
        card_order("ForgedOrder00001"), rsa.generate_private_key(public_exponent=65537, key_size=2048)
    )
    stop, counts = asyncio.Event(), []
    tasks = [asyncio.create_task(flood(url, forged, stop, counts)) for _ in range(flooders)]
    await asyncio.sleep(1)  # let the flood reach full speed
    started, flooded_before = time.perf_counter(), len(counts)
    under_flood = await valid_latencies(url, trusted, "Flood-", valid)
    elapsed, forged_sent = time.perf_counter() - started, len(counts) - flooded_before
    stop.set()
    await asyncio.gather(*tasks)

    def line(name: str, values: list[float]) -> str:
        return f"{name:<22} p50 {percentile(values, 50) * 1000:7.2f} ms   p99 {percentile(values, 99) * 1000:7.2f} ms"

    print(line("valid, alone", alone))
    print(line(f"valid, {flooders} flooders", under_flood))
    print(
        f"flood: {forged_sent} forged tokens refused (401) in {elapsed:.1f}s ({forged_sent / elapsed:.0f}/s)"
    )
    print(
        f"ratio under flood / alone: p50 x{percentile(under_flood, 50) / percentile(alone, 50):.1f}, "
        f"p99 x{percentile(under_flood, 99) / percentile(alone, 99):.1f}"
    )


@contextlib.contextmanager
def trusted_receiver(**settings: str) -> Iterator[tuple[int, int, rsa.RSAPrivateKey]]:
    """A Redis of its own and a real `intergiro-receiver serve` trusting a fresh signing key, with more
    `settings` (environment variables): (port, the receiver's pid, that key); both stopped after."""
    redis_server = RedisServer()
    redis_server.start()
    trusted = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    port = free_port()
    try:
        with tempfile.TemporaryDirectory() as folder:
            key_file = Path(folder) / "trusted.pem"
            key_file.write_text(pem_public(trusted))
            env = serve_env(redis_server.url, port, INTERGIRO_PUBLIC_KEYS=f"@{key_file}", LOG_LEVEL="WARNING")
            env.update(settings)
            log = Path(folder) / "serve.log"
            receiver = start_server("serve", port=port, env=env, log=log, cwd=Path(folder))
            try:
                yield port, receiver.pid, trusted
            finally:
                stop(receiver)
    finally:
        redis_server.cleanup()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--valid", type=int, default=200, help="valid callbacks per phase")
    parser.add_argument("--flooders", type=int, default=16, help="concurrent clients posting forged tokens")
    args = parser.parse_args()
    with trusted_receiver() as (port, _, trusted):
        asyncio.run(run(f"http://127.0.0.1:{port}/callbacks/intergiro", trusted, args.valid, args.flooders))


if __name__ == "__main__":
    main()

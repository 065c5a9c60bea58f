"""What hostile input costs a real `intergiro-receiver serve` process: receiver memory per connection
that sends a large unfinished request head, and the time of a replayed long event list.

Starts its own Redis and a receiver (from this tree, or from `--source DIR`, another checkout, for a
before/after in the same run), then:

- heads: opens `--connections` connections, each sending as much of a request head as the receiver
  accepts without answering (header lines just under its line limit, never the blank line ending the
  head), and reads the receiver's resident memory before, with them open, and after they closed;
- replay: posts a signed order with `--events` events once, then the very same token `--replays`
  times, timing each replay and `/healthz` while the replays run.

    .venv/bin/python bench/hostile_input.py [--source DIR] [--connections 200] [--events 999]
"""

from __future__ import annotations

import argparse
import asyncio
import socket
import statistics
import sys
import time
from pathlib import Path

import aiohttp
from cryptography.hazmat.primitives.asymmetric import rsa

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.hostile import trusted_receiver
from tests.helpers import JWT, card_order, token


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def heads(port: int, pid: int, connections: int, line_bytes: int, lines: int) -> None:
    """Connections that each send `lines` header lines of `line_bytes` and then wait."""
    before = rss_mib(pid)
    opened = []
    head = b"POST /callbacks/intergiro HTTP/1.1\r\nHost: r\r\n" + b"".join(
        f"X-Pad-{i}: ".encode() + b"p" * (line_bytes - 12) + b"\r\n" for i in range(lines)
    )
    refused = 0
    for _ in range(connections):
        connection = socket.create_connection(("127.0.0.1", port), timeout=5)
        try:
            connection.sendall(head)
        except OSError:
            refused += 1
        opened.append(connection)
    time.sleep(1.0)
    during = rss_mib(pid)
    for connection in opened:
        connection.close()
    time.sleep(2.0)
    after = rss_mib(pid)
    print(
        f"heads: {connections} connections x {len(head) / 1024:.0f} KiB of unfinished head: receiver RSS "
        f"{before:.1f} MiB before, {during:.1f} MiB with them open "
        f"({(during - before) * 1024 / connections:.1f} KiB per connection), {after:.1f} MiB after they "
        f"closed ({refused} sends refused)"
    )


async def replay(url: str, key: rsa.RSAPrivateKey, events: int, replays: int, meta_bytes: int) -> None:
    events_list = ("order", "charge", *["refund"] * (events - 2))
    order = card_order("ReplayBench00001", events=events_list, items=10**6, meta={"note": "m" * meta_bytes})
    body = token(order, key)
    base = url.rsplit("/callbacks", 1)[0]
    async with aiohttp.ClientSession() as session:
        started = time.perf_counter()
        async with session.post(url, data=body, headers=JWT) as answer:
            assert answer.status == 200, (answer.status, await answer.text())
        first = time.perf_counter() - started
        stalls: list[float] = []
        done = asyncio.Event()

        async def probe() -> None:
            while not done.is_set():
                began = time.perf_counter()
                async with session.get(f"{base}/healthz") as answer:
                    await answer.read()
                stalls.append(time.perf_counter() - began)
                await asyncio.sleep(0.01)

        prober = asyncio.create_task(probe())
        times = []
        for _ in range(replays):
            began = time.perf_counter()
            async with session.post(url, data=body, headers=JWT) as answer:
                assert (await answer.json())["status"] == "duplicate"
            times.append(time.perf_counter() - began)
        done.set()
        await prober
    print(
        f"replay: {len(body) / 1024:.0f} KiB token with {events} events: first post {first * 1000:.0f} ms; "
        f"{replays} replays median {statistics.median(times) * 1000:.1f} ms, max {max(times) * 1000:.1f} ms; "
        f"/healthz during them max {max(stalls) * 1000:.1f} ms"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", type=Path, help="run the receiver from this checkout instead")
    parser.add_argument("--connections", type=int, default=200)
    parser.add_argument("--line-bytes", type=int, default=4000, help="bytes per header line sent")
    parser.add_argument("--lines", type=int, default=30, help="header lines per connection")
    parser.add_argument("--events", type=int, default=999)
    parser.add_argument("--replays", type=int, default=20)
    parser.add_argument("--meta-bytes", type=int, default=16_000, help="`meta` copied into every update")
    args = parser.parse_args()

    settings = {"MAX_CALLBACK_EVENTS": "1000", "RECEIVER_MAX_CONNECTIONS": str(args.connections + 50)}
    if args.source:
        settings["PYTHONPATH"] = str(args.source.resolve())
    with trusted_receiver(**settings) as (port, pid, trusted):
        print(f"receiver from {args.source or 'this tree'}")
        heads(port, pid, args.connections, args.line_bytes, args.lines)
        url = f"http://127.0.0.1:{port}/callbacks/intergiro"
        asyncio.run(replay(url, trusted, args.events, args.replays, args.meta_bytes))


if __name__ == "__main__":
    main()

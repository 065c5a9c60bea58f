"""bench/round_trips: Redis round trips per delivery, and how many of them write (each a disk flush with
`appendfsync always`), counted on RQ's own loop.

Starts its own Redis (bench/production_redis.py; persistence does not change the count) and a merchant
sink (bench/drain_sink.py), stores `--updates` updates through the real intake, and delivers them with a
DeliveryWorker in burst mode in this process (as `worker --processes 1` does, without the maintenance
thread), on a redis-py connection class that notes the command names of every round trip it sends.
Prints the round trips and the writing ones per delivery, and the writing ones by their commands.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import dataclasses
import logging
import os
import signal
import subprocess
import sys
from typing import Any

import redis
from rq import Queue
from rq.serializers import JSONSerializer

from bench.drain import SECRET, store_updates
from bench.production_redis import ProductionRedis
from receiver.chains import OrderChains
from receiver.settings import Settings
from tests.processes import free_port, wait_for_port
from workers.delivery import DeliveryContext, use_context
from workers.worker import attempt_timeout_seconds, delivery_worker

SCRIPTS = {b"EVAL", b"EVALSHA", b"FCALL"}
# A write command that, sent on its own, changes nothing in the usual case, and a change of nothing is not
# written to the append-only file (so not flushed): RQ's sweep of a registry's expired entries.
SWEEPS = {b"ZREMRANGEBYSCORE"}


def command_names(packed: Any) -> list[bytes]:
    """The command names in what redis-py sends in one go (one command, or a pipeline's many)."""
    chunks = [packed] if isinstance(packed, bytes | bytearray | memoryview) else packed
    lines = b"".join(bytes(c) for c in chunks).split(b"\r\n")
    names, i = [], 0
    while i < len(lines):
        if lines[i].startswith(b"*") and i + 2 < len(lines):
            names.append(lines[i + 2].upper())
            i += 1 + 2 * int(lines[i][1:])  # past the array's $length and value lines
        else:
            i += 1
    return names


class NotingConnection(redis.Connection):
    """A redis-py connection that notes the command names of every round trip it sends."""

    sent: list[list[bytes]] = []

    def send_packed_command(self, command: Any, check_health: bool = True) -> None:
        NotingConnection.sent.append(command_names(command))
        super().send_packed_command(command, check_health)


def write_commands(client: redis.Redis) -> set[bytes]:
    """The commands Redis flags as writes (COMMAND)."""
    return {
        name.encode().upper()
        for name, info in client.command().items()
        if "write" in {f.decode() if isinstance(f, bytes) else f for f in info["flags"]}
    }


def is_writing(names: list[bytes], writes: set[bytes]) -> bool:
    """Whether a round trip makes Redis flush its append-only file (with `appendfsync always`)."""
    return names != [*SWEEPS] and any(n in writes or n in SCRIPTS for n in names)


def noting_client(url: str) -> redis.Redis:
    pool = redis.ConnectionPool.from_url(url, connection_class=NotingConnection, socket_timeout=10)
    return redis.Redis(connection_pool=pool)


def deliver_all(settings: Settings, client: redis.Redis) -> None:
    """Deliver every queued update of `settings`' merchant with a DeliveryWorker in burst mode, in this
    process, on `client` (this process's delivery context becomes one on `client`)."""
    context = DeliveryContext.create(settings)
    chains = OrderChains(client, context.keys, settings.history_retention_seconds)
    use_context(dataclasses.replace(context, redis=client, chains=chains))
    queue = Queue(context.keys.queue_name, connection=client, serializer=JSONSerializer)
    worker = delivery_worker(queue, client, attempt_timeout_seconds(settings))
    handlers = {number: signal.getsignal(number) for number in (signal.SIGINT, signal.SIGTERM)}
    rq_log = logging.getLogger("rq.worker")
    rq_log_before = (list(rq_log.handlers), rq_log.propagate, rq_log.level)
    try:
        worker.work(burst=True, logging_level="WARNING")
    finally:  # RQ installed its own SIGINT and SIGTERM handlers and log handlers: the caller's come back
        for number, handler in handlers.items():
            signal.signal(number, handler)
        rq_log.handlers[:], rq_log.propagate, rq_log.level = rq_log_before


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench/round_trips", description=__doc__.split("\n")[0])
    parser.add_argument(
        "--updates", type=int, default=400, help="updates delivered, two per order (default 400)"
    )
    args = parser.parse_args(argv)
    server = ProductionRedis("none")
    server.start()
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k in ("PATH", "HOME", "LANG", "LC_ALL")}
    env["PYTHONPATH"] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    sink = subprocess.Popen(
        [sys.executable, "-m", "bench.drain_sink", str(port)], env=env, cwd=env["PYTHONPATH"]
    )
    try:
        wait_for_port(port, sink, "sink")
        orders = max(1, args.updates // 2)
        asyncio.run(store_updates(server.url, orders))
        client = noting_client(server.url)
        writes = write_commands(client)
        NotingConnection.sent = []
        deliver_all(Settings.from_env({
            "REDIS_URL": server.url, "MERCHANT_WEBHOOK_URL": f"http://127.0.0.1:{port}/hooks",
            "MERCHANT_WEBHOOK_SECRET": SECRET, "LOG_LEVEL": "WARNING", "LOG_FORMAT": "json",
        }), client)  # fmt: skip
        sent = NotingConnection.sent
        deliveries = orders * 2
        writing = [names for names in sent if is_writing(names, writes)]
        print(f"{deliveries} deliveries by one DeliveryWorker: {len(sent) / deliveries:.1f} round trips and"
              f" {len(writing) / deliveries:.1f} writing round trips per delivery")  # fmt: skip
        shapes = collections.Counter(" ".join(n.decode() for n in names) for names in writing)
        for shape, n in shapes.most_common(12):
            print(f"  {n / deliveries:5.2f}  {shape[:110]}")
    finally:
        sink.terminate()
        sink.wait()
        server.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""bench/e2e: latency from the receiver's 200 to the merchant's receipt, at fixed callback rates.

Starts, as a deployment runs them: its own Redis from deploy/redis.conf (`appendfsync always` unless
`--redis everysec|none`, bench/production_redis.py), `intergiro-receiver serve` (local verification,
JSON logs at INFO), `intergiro-receiver worker --processes N` and a merchant that answers 200 at once
and records when each update arrived (bench/drain_sink.py). Then, for each rate in turn, an open-loop
sender POSTs signed callbacks (RS256, one new event each, so one update per callback) on a fixed
schedule for `--seconds`, whatever the answers take, and waits until every update answered 200 has
reached the merchant. Per rate it prints p50/p99/max of (merchant receipt - the 200's arrival at the
sender), whether delivery fell behind (more than half a second of updates still undelivered when the
sending stopped), how many snapshots Redis forked meanwhile, and at the end the highest rate whose
p99 stayed under `--limit-ms` with every lower rate's too.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.request import urlopen

import aiohttp
import orjson
import redis
from standardwebhooks.webhooks import Webhook

from bench.load import percentile
from bench.production_redis import PERSISTENCE, ProductionRedis
from bench.tokens import CACHE, public_pem, token_pool
from receiver.app import event_loop
from receiver.destinations import PROCESSES_PER_DESTINATION
from receiver.rediskeys import RedisKeys
from tests.processes import free_port, wait_for_port

ROOT = Path(__file__).resolve().parents[1]
SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
WARM_UP = 20  # callbacks sent (at 20/s) before the first rate, not counted
BEHIND_SECONDS = 0.5  # undelivered at the end of sending, in seconds of the rate, that counts as behind


@dataclass
class Sent:
    """What the sender saw of one callback: when it was due, when it went, when its 200 came back."""

    due: float
    sent: float = 0.0
    answered: float = 0.0
    status: int = 0
    queued: tuple[str, ...] = ()


@dataclass
class RateResult:
    rate: int
    sent: int
    accepted: int
    failed: int
    delivered: int
    p50_ms: float
    p99_ms: float
    max_ms: float
    answer_p99_ms: float
    send_lag_ms: float  # how late the sender was against its schedule, at worst
    backlog: int  # accepted but not yet delivered when the sending stopped
    drained_s: float  # from the end of sending to the last delivery
    behind: bool
    undelivered: int
    snapshots: int = 0  # Redis forks (BGSAVE) while the rate ran
    fsync_max_ms: int = 0  # Redis' slowest fsync while the rate ran (its latency monitor)
    slow_fsync_seconds: int = 0  # seconds in which an fsync took 10 ms or more


async def send_at_rate(url: str, tokens: list[bytes], rate: int) -> list[Sent]:
    """POST each token at its scheduled time (open loop: a slow answer delays no later send)."""
    headers = {"Content-Type": "application/jwt"}
    connector = aiohttp.TCPConnector(limit=0)
    timeout = aiohttp.ClientTimeout(total=60)
    start = time.monotonic() + 0.05
    records = [Sent(due=start + i / rate) for i in range(len(tokens))]

    async def post(session: aiohttp.ClientSession, token: bytes, record: Sent) -> None:
        record.sent = time.monotonic()
        try:
            async with session.post(url, data=token, headers=headers) as answer:
                body = await answer.read()
                record.answered = time.monotonic()
                record.status = answer.status
                if answer.status == 200:
                    record.queued = tuple(orjson.loads(body).get("queued", ()))
        except (TimeoutError, aiohttp.ClientError):
            record.answered = time.monotonic()

    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        tasks = []
        for token, record in zip(tokens, records, strict=True):
            delay = record.due - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.ensure_future(post(session, token, record)))
        await asyncio.gather(*tasks)
    return records


def run_sender(url: str, tokens: list[bytes], rate: int) -> list[Sent]:
    loop = event_loop()
    try:
        return loop.run_until_complete(send_at_rate(url, tokens, rate))
    finally:
        loop.close()


def collect(sink_port: int, expected: set[str], timeout: float) -> tuple[dict[str, float], list[dict]]:
    """Receipt time of every update the sink gets, until all of `expected` arrived or `timeout` passed."""
    receipts: dict[str, float] = {}
    samples: list[dict] = []
    deadline = time.monotonic() + timeout
    while True:
        with urlopen(f"http://127.0.0.1:{sink_port}/received") as answer:
            got = orjson.loads(answer.read())
        for update_id, at in zip(got["ids"], got["times"], strict=True):
            receipts.setdefault(update_id, at)  # a redelivery keeps the first receipt
        samples += got["samples"]
        if expected <= receipts.keys() or time.monotonic() > deadline:
            return receipts, samples
        time.sleep(0.1)


def measure(rate: int, records: list[Sent], receipts: dict[str, float]) -> RateResult:
    accepted = [r for r in records if r.status == 200]
    latencies = sorted(
        receipts[u] - r.answered for r in accepted for u in r.queued if u in receipts
    )  # fmt: skip
    expected = [u for r in accepted for u in r.queued]
    end_of_sending = max(r.sent for r in records)
    delivered_by_end = sum(1 for u in expected if receipts.get(u, float("inf")) <= end_of_sending)
    acked_by_end = sum(len(r.queued) for r in accepted if r.answered <= end_of_sending)
    backlog = max(0, acked_by_end - delivered_by_end)
    last = max((receipts[u] for u in expected if u in receipts), default=end_of_sending)
    answers = sorted(r.answered - r.sent for r in records)
    undelivered = sum(1 for u in expected if u not in receipts)
    return RateResult(
        rate=rate,
        sent=len(records),
        accepted=len(accepted),
        failed=len(records) - len(accepted),
        delivered=len(expected) - undelivered,
        p50_ms=percentile(latencies, 50) * 1000,
        p99_ms=percentile(latencies, 99) * 1000,
        max_ms=(latencies[-1] if latencies else 0.0) * 1000,
        answer_p99_ms=percentile(answers, 99) * 1000,
        send_lag_ms=max(r.sent - r.due for r in records) * 1000,
        backlog=backlog,
        drained_s=max(0.0, last - end_of_sending),
        behind=backlog > BEHIND_SECONDS * rate or undelivered > 0,
        undelivered=undelivered,
    )


def signatures_verify(samples: list[dict]) -> bool:
    hook = Webhook(SECRET)
    try:
        for sample in samples:
            hook.verify(sample["body"], sample["headers"])
    except Exception:
        return False
    return True


def peak_rss_mib(pid: int) -> list[float]:
    """The peak resident memory (VmHWM) of process `pid` and of its children, in MiB."""
    found = []
    try:
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except OSError:
        return found
    for each in [pid, *map(int, children)]:
        try:
            for line in Path(f"/proc/{each}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    found.append(int(line.split()[1]) / 1024)
        except OSError:
            continue
    return found


def wait_for_workers(client: redis.Redis, count: int, workers: list[subprocess.Popen[bytes]]) -> None:
    deadline = time.monotonic() + 60
    while client.scard("rq:workers") < count:
        if any(w.poll() is not None for w in workers):
            raise SystemExit("bench: a worker command exited at start")
        if time.monotonic() > deadline:
            raise SystemExit(f"bench: {count} worker process(es) did not register in 60 s")
        time.sleep(0.05)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench/e2e", description=__doc__.split("\n")[0])
    parser.add_argument(
        "--rates", default="50,100,150,200", help="callbacks/s, in turn (default 50,100,150,200)"
    )
    parser.add_argument("--seconds", type=float, default=10.0, help="sending time per rate (default 10)")
    parser.add_argument("--processes", type=int, default=PROCESSES_PER_DESTINATION,
                        help=f"`worker --processes N` (default {PROCESSES_PER_DESTINATION}, the worker's own)")  # fmt: skip
    parser.add_argument("--replicas", type=int, default=1,
                        help="worker commands started, each with --processes N, as compose and k8s replicas (default 1)")  # fmt: skip
    parser.add_argument("--redis", choices=PERSISTENCE, default="always",
                        help="persistence: deploy/redis.conf as is (always, the default), everysec, none")  # fmt: skip
    parser.add_argument("--merchant-ms", type=float, default=0.0,
                        help="the merchant answers this long after a POST arrives (default 0: at once)")  # fmt: skip
    parser.add_argument("--concurrency", type=int, default=None,
                        help="DELIVERY_CONCURRENCY of the workers (default: the worker's own)")  # fmt: skip
    parser.add_argument("--max-in-flight", type=int, default=None,
                        help="MERCHANT_MAX_IN_FLIGHT, the bound on requests open at once to the merchant"
                             " across every worker (default: the product's own)")  # fmt: skip
    parser.add_argument("--limit-ms", type=float, default=100.0, help="the p99 to stay under (default 100)")
    parser.add_argument("--drain-timeout", type=float, default=60.0,
                        help="seconds to wait after sending for the last update (default 60)")  # fmt: skip
    parser.add_argument("--keep-going", action="store_true",
                        help="try the higher rates after one fell behind (default: stop there)")  # fmt: skip
    args = parser.parse_args(argv)
    rates = [int(r) for r in args.rates.split(",") if r.strip()]
    counts = [max(1, round(rate * args.seconds)) for rate in rates]
    print(f"signing {WARM_UP + sum(counts)} one-event tokens (cached in {CACHE}) ...", flush=True)
    tokens = token_pool(WARM_UP + sum(counts), events=1)
    server = ProductionRedis(args.redis)
    server.start()
    workdir = Path(tempfile.mkdtemp(prefix="igr-e2e-"))
    key_file = workdir / "bench-public.pem"
    key_file.write_text(public_pem())
    sink_port, receiver_port = free_port(), free_port()
    base_env = {k: v for k, v in os.environ.items() if k in ("PATH", "HOME", "LANG", "LC_ALL")}
    base_env["PYTHONPATH"] = str(ROOT)
    app_env = {
        **base_env,
        "REDIS_URL": server.url,
        "RECEIVER_HOST": "127.0.0.1",
        "RECEIVER_PORT": str(receiver_port),
        "INTERGIRO_ENVIRONMENT": "production",
        "INTERGIRO_VERIFY": "local",
        "INTERGIRO_PUBLIC_KEYS": f"@{key_file}",
        "MERCHANT_WEBHOOK_URL": f"http://127.0.0.1:{sink_port}/hooks",
        "MERCHANT_WEBHOOK_SECRET": SECRET,
        "LOG_FORMAT": "json",
        "LOG_LEVEL": "INFO",
    }
    if args.concurrency is not None:
        app_env["DELIVERY_CONCURRENCY"] = str(args.concurrency)
    if args.max_in_flight is not None:
        app_env["MERCHANT_MAX_IN_FLIGHT"] = str(args.max_in_flight)
    command = str(Path(sys.executable).parent / "intergiro-receiver")
    processes: list[subprocess.Popen[bytes]] = []
    results: list[RateResult] = []
    failures = 0

    def start(name: str, argv: list[str], env: dict[str, str], cwd: Path) -> subprocess.Popen[bytes]:
        log = (workdir / f"{name}.log").open("wb")
        process = subprocess.Popen(argv, env=env, cwd=cwd, stdout=log, stderr=log)
        processes.append(process)
        return process

    try:
        sink = start(
            "sink",
            [sys.executable, "-m", "bench.drain_sink", str(sink_port), str(args.merchant_ms)],
            base_env,
            ROOT,
        )
        receiver = start("receiver", [command, "serve"], app_env, workdir)  # workdir: no .env of ours
        workers = [
            start(f"worker-{n}", [command, "worker", "--processes", str(args.processes)], app_env, workdir)
            for n in range(args.replicas)
        ]
        wait_for_port(sink_port, sink, "sink")
        wait_for_port(receiver_port, receiver, "receiver")
        client = redis.Redis.from_url(server.url)
        wait_for_workers(client, args.processes * args.replicas, workers)
        print(server.describe())
        client.config_set("latency-monitor-threshold", 1)  # record every fsync of 1 ms or more
        print(f"receiver: `intergiro-receiver serve` (1 process); workers: {args.replicas} x `intergiro-receiver worker"
              f" --processes {args.processes}` (DELIVERY_CONCURRENCY {app_env.get('DELIVERY_CONCURRENCY', 'default')},"
              f" MERCHANT_MAX_IN_FLIGHT {app_env.get('MERCHANT_MAX_IN_FLIGHT', 'default')});"
              f" merchant: bench/drain_sink.py answering after {args.merchant_ms:g} ms; {args.seconds:g} s per rate,"
              f" open-loop sender, one update per callback", flush=True)  # fmt: skip
        url = f"http://127.0.0.1:{receiver_port}/callbacks/intergiro"
        warm = run_sender(url, tokens[:WARM_UP], 20)
        collect(sink_port, {u for r in warm for u in r.queued}, args.drain_timeout)
        offset = WARM_UP
        for rate, count in zip(rates, counts, strict=True):
            forks = client.info("stats")["total_forks"]
            client.execute_command("LATENCY", "RESET")
            records = run_sender(url, tokens[offset : offset + count], rate)
            offset += count
            expected = {u for r in records if r.status == 200 for u in r.queued}
            receipts, samples = collect(sink_port, expected, args.drain_timeout)
            result = measure(rate, records, receipts)
            # a snapshot (deploy/redis.conf: `save ... 60 10000`) forks, and its disk writes slow the fsyncs
            result.snapshots = client.info("stats")["total_forks"] - forks
            # Redis' own record of its slow fsyncs (`appendfsync always`), at most one sample a second
            history = client.execute_command("LATENCY", "HISTORY", "aof-fsync-always")
            result.fsync_max_ms = max((int(ms) for _at, ms in history), default=0)
            result.slow_fsync_seconds = sum(1 for _at, ms in history if int(ms) >= 10)
            results.append(result)
            signed = "signatures ok" if signatures_verify(samples) else "A SIGNATURE DID NOT VERIFY"
            problem = result.failed or result.undelivered or not signed.endswith("ok")
            failures += bool(problem)
            print(f"rate {rate:>4}/s: {result.accepted:,} accepted ({result.failed} refused/failed),"
                  f" {result.delivered:,} delivered; p50 {result.p50_ms:,.1f} ms, p99 {result.p99_ms:,.1f} ms,"
                  f" max {result.max_ms:,.1f} ms; 200 p99 {result.answer_p99_ms:.1f} ms; sender at most"
                  f" {result.send_lag_ms:.1f} ms late;"
                  f" {result.backlog} undelivered at the end of sending, last delivery {result.drained_s:.2f} s"
                  f" after it; Redis snapshots (forks) {result.snapshots}, slowest fsync {result.fsync_max_ms} ms,"
                  f" {result.slow_fsync_seconds} s with one >= 10 ms; {signed}", flush=True)  # fmt: skip
            if result.behind and not args.keep_going and rate != rates[-1]:
                print(f"fell behind at {rate}/s: the higher rates are skipped (--keep-going runs them)")
                break
        print_table(results, args)
        peaks = [mib for w in workers for mib in peak_rss_mib(w.pid)]
        print("worker processes' peak RSS (VmHWM, the command and its children): "
              + ", ".join(f"{mib:.0f}" for mib in peaks) + " MiB")  # fmt: skip
        dead = client.hlen(RedisKeys().dead_letters)
        if dead:
            failures += 1
            print(f"CHECK FAILED: {dead} update(s) in the dead-letter queue")
    finally:
        for process in reversed(processes):
            process.terminate()
        for process in processes:
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                process.kill()
        server.cleanup()
    if failures:
        print(f"bench: {failures} problem(s); logs in {workdir}", file=sys.stderr)
        return 1
    return 0


def print_table(results: list[RateResult], args: argparse.Namespace) -> None:
    print(f"\n{'rate/s':>6} {'p50 ms':>9} {'p99 ms':>9} {'max ms':>9} {'200 p99 ms':>10}"
          f" {'backlog':>8} {'drain s':>8} {'forks':>5} {'fsync max ms':>12}  behind")  # fmt: skip
    for r in results:
        print(f"{r.rate:>6} {r.p50_ms:>9,.1f} {r.p99_ms:>9,.1f} {r.max_ms:>9,.1f} {r.answer_p99_ms:>10.1f}"
              f" {r.backlog:>8} {r.drained_s:>8.2f} {r.snapshots:>5} {r.fsync_max_ms:>12}  {'yes' if r.behind else 'no'}")  # fmt: skip
    held = 0  # the highest rate that held, with every lower rate holding too
    for r in sorted(results, key=lambda r: r.rate):
        if r.p99_ms > args.limit_ms or r.behind:
            break
        held = r.rate
    best = f"{held}/s" if held else "none of the rates"
    print(
        f"\nhighest rate with p99 <= {args.limit_ms:g} ms and not behind: {best}"
        f" ({args.replicas} x {args.processes} worker process(es), concurrency"
        f" {args.concurrency or 'default'}, merchant {args.merchant_ms:g} ms, Redis {args.redis})"
    )


if __name__ == "__main__":
    raise SystemExit(main())

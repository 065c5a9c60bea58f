"""bench/drain: updates/s the workers deliver, against RQ's own no-op job rate, same run.

Starts its own Redis on a free port, configured from deploy/redis.conf (`appendfsync always`, as
production runs it; `--redis everysec` or `--redis none` for no persistence: bench/production_redis.py),
and a merchant sink (bench/drain_sink.py, its own process, 200 at
once). Each round, on a freshly emptied Redis, the systems in turn (in one order in odd rounds, in the
reverse order in even ones):
  delivery  N updates (two events each of N/2 orders, stored through the real `Intake.store`, so one
            order's second update waits for its first) delivered by `intergiro-receiver worker --burst
            --processes P` (DeliveryWorker, a SimpleWorker) as signed POSTs to the sink;
  1 in flight  the same, with DELIVERY_CONCURRENCY=1 (each process one delivery at a time);
  before    with --source DIR: the same, by the worker of the checkout in DIR (`python -m receiver` with
            DIR first on PYTHONPATH): worker CPU per delivery before and after a change, same run;
  no-op     N no-op jobs enqueued with `rq` (JSON serializer) on another queue and run by P forked
            SimpleWorkers in burst mode (bench/noop_worker.py);
  fan-out   with --destinations 2: the same N updates queued for two destinations (`merchant` and
            `erp`, each its own sink process and secret), delivered by `worker --burst --processes P`
            (P processes per destination); each destination's updates/s is timed to its sink's last
            delivery, beside the one-destination delivery run of the same round.
A run is timed from the first job leaving the queue (process start-up is not counted) to the exit of
the worker command. After every delivery run it checks that the sink got every update exactly once,
each order's in sequence, that sampled signatures verify, and that Redis keeps nothing of them.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from urllib.request import urlopen

import orjson
import redis
from redis.asyncio import Redis
from rq import Queue
from rq.registry import FailedJobRegistry
from rq.serializers import JSONSerializer
from standardwebhooks.webhooks import Webhook

from bench.ingest import cpu_seconds
from bench.production_redis import PERSISTENCE, ProductionRedis
from bench.tokens import bench_order, order_id
from receiver.intake import Intake
from receiver.order import build_updates, parse_order
from receiver.rediskeys import RedisKeys
from receiver.settings import Settings
from tests.processes import free_port, wait_for_port

ROOT = Path(__file__).resolve().parents[1]
SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
ERP_SECRET = "whsec_" + "RVJQLXNlY3JldC1mb3ItdGhlLWVycC1kZXN0aW5hdGlvbg=="
NOOP_QUEUE = "bench-noop"
ONE_AT_A_TIME = (
    "1 in flight"  # the delivery system with DELIVERY_CONCURRENCY=1: each process as before issue 25
)
BEFORE = "before"  # --source: the worker of another checkout
TARGET = 0.60  # issue 15: the price of an RQ upgrade that needs no code review
EVENTS = ("0-order", "1-charge")  # the two events of every bench order, in sequence


@dataclass
class Runs:
    rates: list[float] = field(default_factory=list)
    worker_cpu_us: list[float] = field(default_factory=list)
    redis_cpu_us: list[float] = field(default_factory=list)
    sink_cpu_us: list[float] = field(default_factory=list)


def children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


async def store_updates(url: str, orders: int, settings: Settings | None = None) -> None:
    """Store the bench's updates through the real intake (for `settings`' destinations: `merchant` alone
    when not given)."""
    client = Redis.from_url(url)
    settings = settings or Settings()
    intake = Intake(client, RedisKeys(), settings.dedup_ttl_seconds, destinations=settings.destinations)
    for start in range(0, orders, 50):
        batch = [
            build_updates(parse_order(bench_order(i)), received_at="2026-01-01T09:00:06.000Z",
                          verified_by="local:bench")
            for i in range(start, min(start + 50, orders))
        ]  # fmt: skip
        stored = await asyncio.gather(*(intake.store(u) for u in batch))
        assert all(len(ids) == 2 for ids in stored), "an event was not new"
    await client.aclose()


def enqueue_noops(client: redis.Redis, count: int) -> None:
    queue = Queue(NOOP_QUEUE, connection=client, serializer=JSONSerializer)
    for start in range(0, count, 1000):
        jobs = [
            Queue.prepare_data("bench.noop_worker.noop", result_ttl=0)
            for _ in range(min(1000, count - start))
        ]
        queue.enqueue_many(jobs)


def timed(command: list[str], env: dict[str, str], cwd: Path, log: Path, client: redis.Redis,
          queue_key: str) -> tuple[float, float, int]:  # fmt: skip
    """Run the worker command; seconds from the first job leaving the queue to its exit, its CPU, its code."""
    initial = client.llen(queue_key)
    cpu_before = children_cpu()
    with log.open("ab") as out:
        process = subprocess.Popen(command, env=env, cwd=cwd, stdout=out, stderr=out)
        while process.poll() is None and client.llen(queue_key) >= initial:
            time.sleep(0.002)
        started = time.perf_counter()
        code = process.wait()
    return time.perf_counter() - started, children_cpu() - cpu_before, code


def check_delivery(
    received: dict[str, list], orders: int, client: redis.Redis, secret: str = SECRET,
    destinations: tuple[str, ...] = ("merchant",),
) -> str:  # fmt: skip
    ids: list[str] = received["ids"]
    expected = {f"{order_id(i)}-{e}" for i in range(orders) for e in EVENTS}
    problems = []
    position = {update_id: n for n, update_id in enumerate(ids)}
    if len(ids) != len(expected) or set(ids) != expected:
        extra, missing = len(ids) - len(set(ids)), len(expected - set(ids))
        problems.append(f"{len(ids)} POSTs for {len(expected)} updates ({extra} repeated, {missing} missing)")
    out_of_order = sum(
        1 for i in range(orders)
        if position.get(f"{order_id(i)}-{EVENTS[0]}", -1) > position.get(f"{order_id(i)}-{EVENTS[1]}", -1)
    )  # fmt: skip
    if out_of_order:
        problems.append(f"{out_of_order} orders delivered out of sequence")
    hook = Webhook(secret)
    for sample in received["samples"]:
        try:
            hook.verify(sample["body"], sample["headers"])
        except Exception as exc:
            problems.append(f"a signature did not verify: {exc}")
            break
    patterns = ("rq:job:*", "igr:order:*", "igr:delivery:*", "igr:dest:*")
    left = [k for pattern in patterns for k in client.scan_iter(pattern)]
    keys = RedisKeys()
    pending = client.hlen(keys.pending_updates)
    for own in (keys if name == "merchant" else keys.for_destination(name) for name in destinations):
        pending += (
            client.llen(own.rq_queue) + client.scard(own.active_orders) + client.zcard(own.retry_schedule)
            + client.zcard(own.rq_deferred) + client.zcard(own.rq_scheduled) + client.zcard(own.rq_failed)
        )  # fmt: skip
    if left or pending or client.hlen(keys.dead_letters):
        problems.append(
            f"left in Redis: {left[:3]}, {pending} queued/active/retrying/unfinished/in RQ's registries,"
            f" {client.hlen(keys.dead_letters)} dead"
        )
    if problems:
        return "CHECK FAILED: " + "; ".join(problems)
    return (f"ok: {len(ids):,} updates each POSTed once, {orders:,} orders in sequence,"
            f" {len(received['samples'])} signatures verified, no job or chain left")  # fmt: skip


def check_noop(client: redis.Redis) -> str:
    failed = FailedJobRegistry(NOOP_QUEUE, connection=client, serializer=JSONSerializer).count
    left = client.llen(f"rq:queue:{NOOP_QUEUE}")
    if failed or left:
        return f"CHECK FAILED: {failed} failed, {left} still queued"
    return "ok: queue drained, no failed job"


def median(values: list[float]) -> float:
    return statistics.median(values) if values else 0.0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench/drain", description=__doc__.split("\n")[0])
    parser.add_argument(
        "--updates", type=int, default=5000, help="updates per run, two per order (default 5000)"
    )
    parser.add_argument("--processes", type=int, default=2, help="worker processes, both systems (default 2)")
    parser.add_argument(
        "--rounds", type=int, default=3, help="rounds of delivery and no-op in turn (default 3)"
    )
    parser.add_argument(
        "--destinations", type=int, choices=(1, 2), default=1,
        help="2: also a fan-out run per round, every update to two destinations (default 1)",
    )  # fmt: skip
    parser.add_argument("--source", type=Path,
                        help="also run the worker of another checkout (e.g. a worktree of an earlier commit),"
                             " as the system `before`, for a before/after in the same run")  # fmt: skip
    parser.add_argument("--redis", choices=PERSISTENCE, default="always",
                        help="persistence: deploy/redis.conf as is (always, the default), everysec, none")  # fmt: skip
    args = parser.parse_args(argv)
    orders = max(1, args.updates // 2)
    count = orders * 2
    server = ProductionRedis(args.redis)
    server.start()
    workdir = Path(tempfile.mkdtemp(prefix="igr-drain-"))
    sink_port = free_port()
    base_env = {k: v for k, v in os.environ.items() if k in ("PATH", "HOME", "LANG", "LC_ALL", "PYTHONPATH")}
    base_env["PYTHONPATH"] = str(ROOT)
    sink = subprocess.Popen(
        [sys.executable, "-m", "bench.drain_sink", str(sink_port)], cwd=ROOT, env=base_env
    )
    fan_out = args.destinations == 2
    erp_port = free_port()
    erp_sink = (
        subprocess.Popen([sys.executable, "-m", "bench.drain_sink", str(erp_port)], cwd=ROOT, env=base_env)
        if fan_out
        else None
    )
    worker_command = [str(Path(sys.executable).parent / "intergiro-receiver"), "worker", "--burst",
                      "--processes", str(args.processes)]  # fmt: skip
    noop_command = [sys.executable, "-m", "bench.noop_worker", server.url, NOOP_QUEUE, str(args.processes)]
    worker_env = {
        **base_env,
        "REDIS_URL": server.url,
        "MERCHANT_WEBHOOK_URL": f"http://127.0.0.1:{sink_port}/hooks",
        "MERCHANT_WEBHOOK_SECRET": SECRET,
        "LOG_FORMAT": "json",
        "LOG_LEVEL": "INFO",
    }
    fan_out_env = {
        **worker_env,
        "DESTINATIONS": "erp",
        "DESTINATION_ERP_URL": f"http://127.0.0.1:{erp_port}/hooks",
        "DESTINATION_ERP_SECRET": ERP_SECRET,
    }
    one_at_a_time_env = {**worker_env, "DELIVERY_CONCURRENCY": "1"}  # every process as before issue 25
    # --source: `python -m receiver` of the other checkout, found first on PYTHONPATH
    before_command = [sys.executable, "-m", "receiver", *worker_command[1:]]
    before_env = {**worker_env, "PYTHONPATH": str(args.source.resolve())} if args.source else worker_env
    before_cwd = args.source.resolve() if args.source else workdir
    systems = {"delivery": Runs(), ONE_AT_A_TIME: Runs(), "no-op": Runs()}
    if args.source:
        systems[BEFORE] = Runs()
    if fan_out:
        systems["fan-out"] = Runs()
    per_destination: dict[str, list[float]] = {"merchant": [], "erp": []}
    ratios: list[float] = []
    failures = 0
    try:
        wait_for_port(sink_port, sink, "sink")
        if erp_sink is not None:
            wait_for_port(erp_port, erp_sink, "erp sink")
        client = redis.Redis.from_url(server.url)
        assert server.process is not None
        redis_pid = server.process.pid
        print(f"{count:,} updates ({orders:,} orders x 2 events) / {count:,} no-op jobs per run,"
              f" {args.processes} worker process(es), {args.rounds} rounds; Redis {server.url}", flush=True)  # fmt: skip
        print(server.describe(), flush=True)
        # start-up CPU of each command (an empty burst run), subtracted from the CPU per job below
        client.flushdb()
        startup = {
            "delivery": timed(
                worker_command, worker_env, workdir, workdir / "worker.log", client, "rq:queue:x"
            )[1],
            ONE_AT_A_TIME: timed(
                worker_command, one_at_a_time_env, workdir, workdir / "worker.log", client, "rq:queue:x"
            )[1],
            "no-op": timed(noop_command, base_env, ROOT, workdir / "noop.log", client, "rq:queue:x")[1],
        }
        if args.source:
            startup[BEFORE] = timed(
                before_command, before_env, before_cwd, workdir / "worker.log", client, "rq:queue:x"
            )[1]
        if fan_out:
            startup["fan-out"] = timed(
                worker_command, fan_out_env, workdir, workdir / "worker.log", client, "rq:queue:x"
            )[1]
        for round_number in range(1, args.rounds + 1):
            rates = {}
            # ABBA: the system run first alternates, so a drift of the machine's speed favours neither
            for name, runs in list(systems.items())[:: 1 if round_number % 2 else -1]:
                client.flushdb()
                if name in ("delivery", ONE_AT_A_TIME, BEFORE):
                    asyncio.run(store_updates(server.url, orders))
                    env = {"delivery": worker_env, ONE_AT_A_TIME: one_at_a_time_env}.get(name, before_env)
                    command, cwd = (
                        (before_command, before_cwd) if name == BEFORE else (worker_command, workdir)
                    )
                    queue_key = RedisKeys().rq_queue
                elif name == "fan-out":
                    asyncio.run(
                        store_updates(server.url, orders, Settings.from_env(fan_out_env, dotenv=False))
                    )
                    command, env, cwd, queue_key = worker_command, fan_out_env, workdir, RedisKeys().rq_queue
                else:
                    enqueue_noops(client, count)
                    command, env, cwd, queue_key = noop_command, base_env, ROOT, f"rq:queue:{NOOP_QUEUE}"
                redis_before, sink_before = cpu_seconds(redis_pid), cpu_seconds(sink.pid)
                seconds, cpu, code = timed(command, env, cwd, workdir / f"{name}.log", client, queue_key)
                started_at = time.time() - seconds  # the wall clock the sinks stamp deliveries with
                runs.rates.append(count / seconds)
                jobs = 2 * count if name == "fan-out" else count  # CPU per delivery
                runs.worker_cpu_us.append(max(0.0, cpu - startup[name]) / jobs * 1e6)
                runs.redis_cpu_us.append((cpu_seconds(redis_pid) - redis_before) / jobs * 1e6)
                runs.sink_cpu_us.append((cpu_seconds(sink.pid) - sink_before) / jobs * 1e6)
                if name in ("delivery", ONE_AT_A_TIME, BEFORE):
                    with urlopen(f"http://127.0.0.1:{sink_port}/received") as answer:
                        verdict = check_delivery(orjson.loads(answer.read()), orders, client)
                elif name == "fan-out":
                    verdicts, own_rates = [], []
                    for destination, port, secret in (
                        ("merchant", sink_port, SECRET),
                        ("erp", erp_port, ERP_SECRET),
                    ):
                        with urlopen(f"http://127.0.0.1:{port}/received") as answer:
                            received = orjson.loads(answer.read())
                        verdicts.append(
                            f"{destination}: "
                            + check_delivery(received, orders, client, secret, ("merchant", "erp"))
                        )
                        own_rates.append(count / max(1e-6, received["last_at"] - started_at))
                        per_destination[destination].append(own_rates[-1])
                    runs.rates[-1] = 2 * count / seconds  # deliveries/s, both destinations together
                    verdict = (
                        "; ".join(verdicts)
                        + f"; per destination: merchant {own_rates[0]:,.0f}, erp {own_rates[1]:,.0f} updates/s"
                    )
                    if any("CHECK FAILED" in v for v in verdicts):
                        verdict = "CHECK FAILED: " + verdict
                else:
                    verdict = check_noop(client)
                if code:
                    verdict = f"CHECK FAILED: worker command exited {code}; " + verdict
                failures += verdict.startswith("CHECK FAILED")
                rates[name] = runs.rates[-1]
                print(f"round {round_number} {name:<11} {runs.rates[-1]:>7,.0f} jobs/s ({count:,} in {seconds:5.2f} s)"
                      f"  CPU/job: workers {runs.worker_cpu_us[-1]:4.0f} us, Redis {runs.redis_cpu_us[-1]:3.0f} us,"
                      f" sink {runs.sink_cpu_us[-1]:3.0f} us  {verdict}", flush=True)  # fmt: skip
            ratios.append(rates["delivery"] / rates["no-op"])
        print_table(systems, ratios, args.processes, args.source)
        if fan_out:
            print_fan_out(systems, per_destination, args.processes)
    finally:
        sink.terminate()
        sink.wait(10)
        if erp_sink is not None:
            erp_sink.terminate()
            erp_sink.wait(10)
        server.cleanup()
    if failures:
        print(f"bench: {failures} run(s) failed their check; worker logs in {workdir}", file=sys.stderr)
        return 1
    return 0


def print_fan_out(systems: dict[str, Runs], per_destination: dict[str, list[float]], processes: int) -> None:
    one = systems["delivery"].rates
    print(
        f"\nfan-out, same rounds ({processes} worker process(es) per destination; one machine's cores shared):"
    )
    print(f"{'round':<7} {'1 destination':>14} {'merchant':>9} {'erp':>9} {'both':>9}  (updates/s)")
    rows = zip(
        one, per_destination["merchant"], per_destination["erp"], systems["fan-out"].rates, strict=True
    )
    for n, (single, merchant, erp, both) in enumerate(rows, start=1):
        print(f"{n:<7} {single:>14,.0f} {merchant:>9,.0f} {erp:>9,.0f} {both:>9,.0f}")
    print(f"{'median':<7} {median(one):>14,.0f} {median(per_destination['merchant']):>9,.0f}"
          f" {median(per_destination['erp']):>9,.0f} {median(systems['fan-out'].rates):>9,.0f}")  # fmt: skip


def print_table(systems: dict[str, Runs], ratios: list[float], processes: int, source: Path | None) -> None:
    delivery, noop = systems["delivery"], systems["no-op"]
    print(f"\n{'round':<7} {'updates/s':>10} {'no-op jobs/s':>13} {'ratio':>6}")
    for n, (u, j, r) in enumerate(zip(delivery.rates, noop.rates, ratios, strict=True), start=1):
        print(f"{n:<7} {u:>10,.0f} {j:>13,.0f} {r:>6.0%}")
    ratio = median(ratios)
    print(f"{'median':<7} {median(delivery.rates):>10,.0f} {median(noop.rates):>13,.0f} {ratio:>6.0%}")
    print(f"\nCPU per job (medians, start-up excluded): delivery workers {median(delivery.worker_cpu_us):.0f} us"
          f" + Redis {median(delivery.redis_cpu_us):.0f} us + sink {median(delivery.sink_cpu_us):.0f} us;"
          f" no-op workers {median(noop.worker_cpu_us):.0f} us + Redis {median(noop.redis_cpu_us):.0f} us")  # fmt: skip
    one = systems[ONE_AT_A_TIME]
    print(f"CPU per delivery, 1 in flight per process (DELIVERY_CONCURRENCY=1, as before issue 25): workers"
          f" {median(one.worker_cpu_us):.0f} us + Redis {median(one.redis_cpu_us):.0f} us;"
          f" {median(one.rates):,.0f} updates/s")  # fmt: skip
    if source is not None:
        before = systems[BEFORE]
        print(f"CPU per delivery, worker of --source {source} (before), same rounds: workers"
              f" {median(before.worker_cpu_us):.0f} us + Redis {median(before.redis_cpu_us):.0f} us;"
              f" {median(before.rates):,.0f} updates/s; this checkout (after): workers"
              f" {median(delivery.worker_cpu_us):.0f} us + Redis {median(delivery.redis_cpu_us):.0f} us;"
              f" {median(delivery.rates):,.0f} updates/s")  # fmt: skip
    print(f"worker class: DeliveryWorker (a SimpleWorker taking, starting and ending its jobs in batches,"
          f" a thread pool delivering them), {processes} process(es) each")  # fmt: skip
    print(
        f"target: delivery >= {TARGET:.0%} of the no-op rate: {'met' if ratio >= TARGET else 'NOT met'}"
        f" (median of per-round ratios {ratio:.0%})"
    )


if __name__ == "__main__":
    raise SystemExit(main())

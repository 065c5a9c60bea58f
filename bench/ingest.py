"""bench/ingest: callbacks/s and latency of the receiver against its ceiling and a baseline, same run.

Starts its own Redis on a free port, configured from deploy/redis.conf (`appendfsync always`, as
production runs it; `--redis everysec` or `--redis none` for no persistence: bench/production_redis.py),
and these servers, one process each:
  (a) ceiling   a bare aiohttp app that reads the body and answers 200 (bench/bare.py)
  (b) baseline  the straightforward receiver: PyJWT + SET NX + RQ enqueue in a thread pool (bench/baseline.py)
  (l) lean      a lab floor, not the product: RS256 verify + one Lua call per callback (bench/lean.py)
  (s) source    with `--source DIR`: the receiver of another checkout (e.g. main), for a before/after
  (c) receiver  `intergiro-receiver serve`, production settings (LOG_LEVEL=INFO, JSON logs, local verify)
then loads each in turn, round after round, with the same load (wrk, or the built-in asyncio client),
each token (RS256, about 2 KB, two events, a distinct order) sent once per run on a freshly emptied Redis.
After every run of (b) and (c) it checks that Redis holds exactly one job per event accepted.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import redis

from bench.load import LoadResult, run_asyncio, run_wrk, wrk_available
from bench.production_redis import PERSISTENCE, ProductionRedis
from bench.tokens import CACHE, order_id, public_pem, token_pool
from tests.processes import free_port, wait_for_port

ROOT = Path(__file__).resolve().parents[1]
EVENTS = ((0, "order"), (1, "charge"))  # (sequence, type) of the two events in every bench token
SYSTEMS = ("ceiling", "baseline", "lean", "source", "receiver")
LABELS = {
    "ceiling": "(a) bare aiohttp",
    "baseline": "(b) straightforward",
    "lean": "(l) lean path (lab)",
    "source": "(s) receiver of --source",
    "receiver": "(c) intergiro-receiver",
}
# The receiver's share of the lean path's callbacks/s to reach (issue 27).
LEAN_SHARE_TARGET = 0.7


@dataclass
class Server:
    name: str
    port: int
    process: subprocess.Popen[bytes]
    results: list[LoadResult] = field(default_factory=list)
    cpu_per_request_us: list[float] = field(default_factory=list)
    redis_cpu_per_request_us: list[float] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/callbacks/intergiro"


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (Linux /proc; 0 elsewhere)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def tree_cpu_seconds(pid: int) -> float:
    """CPU time of a process and its children (`serve --processes N` forks N receivers)."""
    try:
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except OSError:
        children = []
    return cpu_seconds(pid) + sum(cpu_seconds(int(child)) for child in children)


def start_servers(
    redis_url: str, workdir: Path, log_level: str, processes: int = 1, source: Path | None = None,
    systems: tuple[str, ...] = SYSTEMS,
) -> dict[str, Server]:  # fmt: skip
    key_file = workdir / "bench-public.pem"
    key_file.write_text(public_pem())
    python = sys.executable
    base_env = {k: v for k, v in os.environ.items() if k in ("PATH", "HOME", "LANG", "LC_ALL", "PYTHONPATH")}
    commands = {
        "ceiling": ([python, "-m", "bench.bare", str(free_port())], ROOT, base_env),
        "baseline": ([python, "-m", "bench.baseline", "0", redis_url, str(key_file)], ROOT, base_env),
        "lean": ([python, "-m", "bench.lean", "0", redis_url, str(key_file)], ROOT, base_env),
        "receiver": (
            # `python -m receiver`: with PYTHONPATH set (--source), the receiver package found first on it
            [python, "-m", "receiver", "serve", "--processes", str(processes)],
            workdir,  # no .env from the repository
            {
                **base_env,
                "REDIS_URL": redis_url,
                "RECEIVER_HOST": "127.0.0.1",
                "RECEIVER_PORT": "0",
                "INTERGIRO_ENVIRONMENT": "production",
                "INTERGIRO_VERIFY": "local",
                "INTERGIRO_PUBLIC_KEYS": f"@{key_file}",
                "LOG_FORMAT": "json",
                "LOG_LEVEL": log_level,
            },
        ),
    }
    if source is not None:
        command, cwd, env = commands["receiver"]
        commands["source"] = (command, cwd, {**env, "PYTHONPATH": str(source.resolve())})
    servers = {}
    for name, (command, cwd, env) in commands.items():
        if name not in systems:
            continue
        port = int(command[3]) if name == "ceiling" else free_port()
        if name in ("baseline", "lean"):
            command[3] = str(port)
        if name in ("receiver", "source"):
            env = {**env, "RECEIVER_PORT": str(port)}
        log = (workdir / f"{name}.log").open("wb")
        process = subprocess.Popen(command, cwd=cwd, env=env, stdout=log, stderr=log)
        servers[name] = Server(name, port, process)
    for server in servers.values():
        wait_for_port(server.port, server.process, server.name)
    return servers


def check_queue(client: redis.Redis, result: LoadResult) -> str:
    """Exactly one job per event of every callback that reached the server, and nothing else.

    Every token answered 200 must have both its jobs; a token still in flight when the load stopped
    (wrk does not wait for them) may have both or neither, never one.
    """
    time.sleep(0.3)  # let the server finish what was in flight
    job_ids = {k.decode().removeprefix("rq:job:") for k in client.scan_iter("rq:job:*", count=10_000)}
    listed = client.llen("rq:queue:order-updates")
    for key in client.scan_iter("igr:order:*:waiting", count=10_000):
        listed += client.llen(key)
    expected_per_order = {f"{order_id(i)}-{s}-{t}" for i in range(result.sent) for s, t in EVENTS}
    orders = {job_id.split("-", 1)[0] for job_id in job_ids}
    whole = all(f"{o}-{s}-{t}" in job_ids for o in orders for s, t in EVENTS)
    problems = []
    if not job_ids <= expected_per_order or not whole:
        problems.append("jobs that match no sent event, or an order with only part of its events")
    if listed != len(job_ids):
        problems.append(f"{len(job_ids)} job hashes but {listed} ids queued or waiting")
    if not result.accepted <= len(orders) <= result.sent or result.failed:
        problems.append(f"{len(orders)} orders stored, {result.accepted} accepted, {result.sent} sent,"
                        f" {result.failed} failed")  # fmt: skip
    if problems:
        return "QUEUE CHECK FAILED: " + "; ".join(problems)
    in_flight = len(orders) - result.accepted
    return f"queue ok: {len(job_ids)} jobs, one per event of {len(orders)} callbacks ({in_flight} in flight at the stop)"


def load(server: Server, args: argparse.Namespace, tokens: list[bytes], tokens_file: Path) -> LoadResult:
    cycle = server.name == "ceiling"  # it keeps nothing, so tokens may repeat
    if args.loader == "wrk":
        return run_wrk(server.url, tokens_file, len(tokens), args.seconds, args.connections, cycle)
    return run_asyncio(server.url, tokens, args.seconds, args.connections, cycle)


def run_once(server: Server, args: argparse.Namespace, tokens: list[bytes], tokens_file: Path,
             client: redis.Redis, redis_pid: int) -> tuple[LoadResult, str]:  # fmt: skip
    """Warm up, empty Redis, load, check the queue; returns the result and the check's verdict."""
    run_asyncio(server.url, tokens[: args.connections * 4], 2.0, args.connections)
    client.flushdb()
    cpu_before, redis_before = tree_cpu_seconds(server.process.pid), cpu_seconds(redis_pid)
    result = load(server, args, tokens, tokens_file)
    requests = max(result.requests, 1)
    server.cpu_per_request_us.append((tree_cpu_seconds(server.process.pid) - cpu_before) / requests * 1e6)
    server.redis_cpu_per_request_us.append((cpu_seconds(redis_pid) - redis_before) / requests * 1e6)
    if server.name == "ceiling":
        return result, ""
    return result, check_queue(client, result)


def median(values: list[float]) -> float:
    return statistics.median(values) if values else 0.0


def print_table(servers: dict[str, Server]) -> None:
    rate = {n: median([r.accepted_per_second for r in s.results]) for n, s in servers.items()}
    p50 = {n: median([r.p50_ms for r in s.results]) for n, s in servers.items()}
    p99 = {n: median([r.p99_ms for r in s.results]) for n, s in servers.items()}
    print()
    cpu = {n: median(s.cpu_per_request_us) for n, s in servers.items()}
    redis_cpu = {n: median(s.redis_cpu_per_request_us) for n, s in servers.items()}

    def share(name: str, of: str) -> float:
        return rate[name] / rate[of] if rate.get(of) else 0.0

    print(f"{'system':<26} {'callbacks/s':>11} {'p50 ms':>8} {'p99 ms':>8} {'vs (a)':>7} {'vs (b)':>7}"
          f" {'vs (l)':>7} {'p99 vs (a)':>10} {'CPU/callback: server':>21} {'Redis':>7}")  # fmt: skip
    for name in (n for n in SYSTEMS if n in servers):
        p99_a = p99[name] / p99["ceiling"] if p99.get("ceiling") else 0
        print(f"{LABELS[name]:<26} {rate[name]:>11,.0f} {p50[name]:>8.2f} {p99[name]:>8.2f}"
              f" {share(name, 'ceiling'):>6.0%} {share(name, 'baseline'):>6.1f}x {share(name, 'lean'):>6.2f}"
              f" {p99_a:>9.1f}x {cpu[name]:>18.0f} us {redis_cpu[name]:>4.0f} us")  # fmt: skip
    if "receiver" not in servers:
        return
    targets = []
    if "ceiling" in servers:
        targets.append(f">= 25% of (a): {'met' if share('receiver', 'ceiling') >= 0.25 else 'NOT met'}")
        ok_p99 = p99["receiver"] <= 4 * p99["ceiling"]
        targets.append(f"p99 <= 4x (a)'s: {'met' if ok_p99 else 'NOT met'}")
    if "baseline" in servers:
        targets.append(f">= 5x (b): {'met' if share('receiver', 'baseline') >= 5 else 'NOT met'}")
    if "lean" in servers:
        ok_lean = share("receiver", "lean") >= LEAN_SHARE_TARGET
        targets.append(f">= {LEAN_SHARE_TARGET:g} of (l): {'met' if ok_lean else 'NOT met'}")
    print("\ntargets: " + "; ".join(targets))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench/ingest", description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=3, help="rounds of (a), (b), (c) in turn (default 3)")
    parser.add_argument("--seconds", type=float, default=5.0, help="length of one run (default 5)")
    parser.add_argument("--connections", type=int, default=32, help="concurrent connections (default 32)")
    parser.add_argument(
        "--requests", type=int, default=40_000, help="at most this many callbacks per run (default 40000)"
    )
    parser.add_argument("--loader", choices=("auto", "wrk", "asyncio"), default="auto")
    parser.add_argument("--log-level", default="INFO", help="the receiver's LOG_LEVEL (default INFO)")
    parser.add_argument("--redis", choices=PERSISTENCE, default="always",
                        help="persistence: deploy/redis.conf as is (always, the default), everysec, none")  # fmt: skip
    parser.add_argument(
        "--processes", type=int, default=1, help="the receiver's `serve --processes N` (default 1)"
    )
    parser.add_argument("--source", type=Path,
                        help="also run the receiver of this checkout, as (s): e.g. `git worktree add /tmp/before main`")  # fmt: skip
    parser.add_argument("--systems", default=",".join(n for n in SYSTEMS if n != "source"),
                        help=f"which of {','.join(SYSTEMS)} to run (default all; source with --source)")  # fmt: skip
    args = parser.parse_args(argv)
    systems = tuple(n for n in SYSTEMS if n in args.systems.split(",") or (n == "source" and args.source))
    if "source" in systems and not args.source:
        parser.error("the system `source` needs --source DIR")
    if args.loader == "auto":
        args.loader = "wrk" if wrk_available() else "asyncio"
    print(f"signing {args.requests} tokens (cached in {CACHE}) ...", flush=True)
    tokens = token_pool(args.requests)
    tokens_file = CACHE / "tokens.txt"
    print(f"token size {len(tokens[0])} bytes; load: {args.loader}, {args.connections} connections,"
          f" {args.seconds:g} s per run, {args.rounds} rounds; receiver LOG_LEVEL={args.log_level},"
          f" --processes {args.processes}; source: {args.source or '-'}", flush=True)  # fmt: skip
    redis_server = ProductionRedis(args.redis)
    redis_server.start()
    print(redis_server.describe(), flush=True)
    workdir = Path(tempfile.mkdtemp(prefix="igr-bench-"))
    servers: dict[str, Server] = {}
    failures = 0
    try:
        client = redis.Redis.from_url(redis_server.url)
        servers = start_servers(
            redis_server.url, workdir, args.log_level, args.processes, args.source, systems
        )
        for round_number in range(1, args.rounds + 1):
            for name in systems:
                server = servers[name]
                assert redis_server.process is not None
                result, verdict = run_once(
                    server, args, tokens, tokens_file, client, redis_server.process.pid
                )
                server.results.append(result)
                failures += verdict.startswith("QUEUE CHECK FAILED")
                note = (
                    " (token pool ran out: raise --requests)"
                    if result.exhausted and name != "ceiling"
                    else ""
                )
                print(f"round {round_number} {LABELS[name]:<26} {result.accepted_per_second:>9,.0f}/s"
                      f"  p50 {result.p50_ms:6.2f} ms  p99 {result.p99_ms:6.2f} ms"
                      f"  CPU/callback {server.cpu_per_request_us[-1]:4.0f} us + Redis {server.redis_cpu_per_request_us[-1]:3.0f} us"
                      f"  {verdict}{note}".rstrip(), flush=True)  # fmt: skip
        print_table(servers)
    finally:
        for server in servers.values():
            server.process.terminate()
        for server in servers.values():
            server.process.wait(10)
        redis_server.cleanup()
    if failures:
        print(f"bench: {failures} run(s) failed the queue check; server logs in {workdir}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

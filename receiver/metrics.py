"""Prometheus metrics, so that summing any counter over every process scraped gives the
deployment's true figure, and each alert fires once per deployment.

- Each process counts its own work in its own registry (the receiver's callbacks, verification
  latency, refused connections) and serves only that: `sum()` over the receivers is the total. With
  `serve --processes N`, the N processes share prometheus_client's multiprocess files, and any of them
  serves their sum.
- Workers and reconcile count into one Redis hash, in the same step as the change they count (so a
  count survives restarts and is never lost or doubled). Those deployment-wide totals, and the
  deployment's gauges (queue depth, dead letters, workers alive), are served by exactly one of the
  processes being scraped: the holder of a short Redis lease, renewed by each of its scrapes
  (receivers and the workers' metrics servers compete for it). Another process takes over within
  METRICS_LEASE_SECONDS when the holder stops being scraped.
- Every process also serves its own `process_*` metrics (CPU, memory, open files).
"""

from __future__ import annotations

import bisect
import itertools
import os
import socket
import time
import uuid
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime
from functools import cache
from pathlib import Path
from typing import Any

from prometheus_client import (
    GC_COLLECTOR,
    PLATFORM_COLLECTOR,
    PROCESS_COLLECTOR,
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector

from receiver import rqstore
from receiver.rediskeys import RedisKeys

# Callbacks per minute by outcome (the ops console's overview) are kept this many minutes in Redis.
CALLBACK_MINUTES_KEPT = 120
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)

# Metrics shared through Redis: name -> (kind, help, label names).
SHARED_METRICS: dict[str, tuple[str, str, tuple[str, ...]]] = {
    "intergiro_deliveries_total": (
        "counter",
        "Deliveries of updates, by outcome and destination (none: merchant).",
        ("outcome", "destination"),
    ),
    "intergiro_delivery_attempts_total": (
        "counter",
        "Delivery attempts, by result and destination (none: merchant).",
        ("result", "destination"),
    ),
    "intergiro_delivery_seconds": (
        "histogram",
        "Time of one delivery attempt, by destination (none: merchant).",
        ("destination",),
    ),
    "intergiro_reconcile_runs_total": ("counter", "Reconcile runs, by outcome.", ("outcome",)),
    "intergiro_reconcile_orders_scanned_total": ("counter", "Orders listed by reconcile.", ()),
    "intergiro_reconcile_missed_events_total": (
        "counter",
        "Events queued by reconcile because their callback never arrived.",
        (),
    ),
    "intergiro_reconcile_watermark_timestamp_seconds": (
        "gauge",
        "End of the last window reconcile completed (Unix time).",
        (),
    ),
}


def _field(name: str, labels: Mapping[str, str]) -> str:
    return name + "".join(f"|{k}={v}" for k, v in sorted(labels.items()))


def count(redis: Any, keys: RedisKeys, name: str, amount: float = 1, **labels: str) -> Any:
    """Add to a shared counter (works on a client or a pipeline, sync or async)."""
    return redis.hincrbyfloat(keys.metrics, _field(name, labels), amount)


def counter_increment(name: str, amount: float = 1, **labels: str) -> tuple[str, float]:
    """A counter's hash field and amount, for a script that adds it in the same step as its change."""
    return _field(name, labels), amount


def set_gauge(redis: Any, keys: RedisKeys, name: str, value: float, **labels: str) -> Any:
    return redis.hset(keys.metrics, _field(name, labels), value)


def observation_increments(name: str, seconds: float, **labels: str) -> list[tuple[str, float]]:
    """The hash fields (and amounts) one observation of a shared histogram adds to.

    Only the one bucket the value falls in is counted (`<name>_in_bucket`, not cumulative), plus sum and
    count: three increments per observation where Prometheus' cumulative buckets would take fifteen.
    The collector adds the buckets up when it renders them."""
    buckets, (inf, total, number) = _histogram_fields(name, tuple(sorted(labels.items())))
    index = bisect.bisect_left(LATENCY_BUCKETS, seconds)
    return [(buckets[index] if index < len(buckets) else inf, 1), (total, seconds), (number, 1)]


def add(redis: Any, keys: RedisKeys, increments: Iterable[tuple[str, float]]) -> None:
    """Add (hash field, amount) increments to the shared metrics (on a pipeline: one round trip)."""
    for field, amount in increments:
        redis.hincrbyfloat(keys.metrics, field, amount)


def observe(redis: Any, keys: RedisKeys, name: str, seconds: float, **labels: str) -> None:
    """Record one observation of a shared histogram (on a pipeline, so it is one round trip)."""
    add(redis, keys, observation_increments(name, seconds, **labels))


@cache
def _histogram_fields(
    name: str, labels: tuple[tuple[str, str], ...]
) -> tuple[tuple[str, ...], tuple[str, str, str]]:
    """The hash fields of one histogram: one per bound (observations in that bucket alone); +Inf's, sum
    and count. Built once per histogram: a worker observes one per delivery."""
    base = dict(labels)
    buckets = tuple(_field(name + "_in_bucket", {**base, "le": str(b)}) for b in LATENCY_BUCKETS)
    inf = _field(name + "_in_bucket", {**base, "le": "+Inf"})
    return buckets, (inf, _field(name + "_sum", base), _field(name + "_count", base))


METRICS_LEASE_SECONDS = 60
# KEYS: the lease, the dead letters, the metrics hash, then per destination: its RQ queue, RQ's worker set
# of the queue, its deferred registry, its retry schedule, RQ's StartedJobRegistry, its state hash.
# ARGV: this process's lease id, the lease in milliseconds, RQ's job key prefix, OLDEST_SCAN.
# One script, so the lease and the figures it entitles this process to serve are read in one step.
# Workers alive: members of RQ's set whose key (`rq:worker:<name>`) still exists; a dead worker stays
# in the set until some worker's maintenance prunes it, but its key expires.
DEPLOYMENT_SCRIPT = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
elseif not redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then
  return {0}
end
-- then, per destination (DESTINATION_KEYS keys each): its queue, its workers, updates waiting behind
-- their order's head, retrying, in flight, its state, and the creation time (RQ's, an ISO string: they
-- sort as text) of the oldest update not yet delivered among the first ARGV[4] of its queue, in-flight
-- and retrying ones: the deployment's sums, and each destination's figures
local alive, depth, per = 0, 0, {}
local scan = tonumber(ARGV[4]) - 1
for i = 4, #KEYS, 6 do
  local queued = redis.call('LLEN', KEYS[i])
  depth = depth + queued
  local workers = 0
  for _, worker in ipairs(redis.call('SMEMBERS', KEYS[i + 1])) do
    workers = workers + redis.call('EXISTS', worker)
  end
  alive = alive + workers
  local state = 'up'
  if redis.call('HEXISTS', KEYS[i + 5], 'paused_at') == 1 then state = 'paused'
  elseif redis.call('HEXISTS', KEYS[i + 5], 'down_since') == 1 then state = 'down' end
  local oldest = ''
  for _, ids in ipairs({redis.call('LRANGE', KEYS[i], 0, scan), redis.call('ZRANGE', KEYS[i + 4], 0, scan),
                        redis.call('ZRANGE', KEYS[i + 3], 0, scan)}) do
    for _, member in ipairs(ids) do
      local created = redis.call('HGET', ARGV[3] .. string.match(member, '^[^:]+'), 'created_at')
      if created and (oldest == '' or created < oldest) then oldest = created end
    end
  end
  table.insert(per, {queued, workers, redis.call('ZCARD', KEYS[i + 2]), redis.call('ZCARD', KEYS[i + 3]),
                     redis.call('ZCARD', KEYS[i + 4]), state, oldest})
end
return {1, depth, redis.call('HLEN', KEYS[2]), alive, redis.call('HGETALL', KEYS[3]), per}
"""
DESTINATION_KEYS = 6
OLDEST_SCAN = 100  # the updates of each list the exporter reads for the oldest undelivered one's age
DESTINATION_GAUGES = {  # per destination, `destination` label always (merchant's too)
    "intergiro_destination_queued": "Updates of the destination on its RQ queue.",
    "intergiro_destination_workers_alive": "Workers serving the destination whose heartbeat has not expired.",
    "intergiro_destination_waiting": "Updates of the destination waiting behind their order's head.",
    "intergiro_destination_retrying": "Updates of the destination waiting for their next attempt.",
    "intergiro_destination_in_flight": "Deliveries to the destination started and not ended.",
    "intergiro_oldest_undelivered_seconds": "Age of the destination's oldest update not yet delivered "
    "(queued, in flight or retrying; 0 when none).",
}
DEPLOYMENT_GAUGES = {
    "intergiro_queue_depth": "Updates waiting in the RQ queue.",
    "intergiro_dead_letter_depth": "Updates in the dead-letter queue.",
    "intergiro_workers_alive": "RQ workers listening on the queue whose heartbeat has not expired.",
    "intergiro_redis_memory_used_bytes": "Memory Redis uses (INFO memory: used_memory).",
    "intergiro_redis_memory_max_bytes": "Redis's maxmemory (0: no limit set).",
}


def _age(created_at: Any, now: float) -> float:
    """Seconds since RQ's `created_at` (0 for none)."""
    text = created_at.decode() if isinstance(created_at, bytes) else str(created_at or "")
    try:
        return (
            max(0.0, now - datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()) if text else 0.0
        )
    except ValueError:
        return 0.0


def exporter_lease_key(keys: RedisKeys) -> str:
    """Who serves the deployment-wide metrics now (beside the hash it is about)."""
    return keys.metrics + ":exporter"


class DeploymentMetrics(Collector):
    """The deployment-wide figures kept in Redis, rendered only while this process holds the lease.

    `keys_and_args()` and `update()` wrap one run of DEPLOYMENT_SCRIPT, on whatever client the
    process has (sync or async); until an update says the lease is held, nothing is rendered."""

    def __init__(self, keys: RedisKeys, destinations: Sequence[RedisKeys] = ()) -> None:
        self.keys = keys
        self.destinations = list(destinations) or [keys]  # every destination's keys (fan-out)
        self.lease_id = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self.held = False
        self.gauges: dict[str, float] = {}
        self.snapshot: dict[str, float] = {}
        self.per_destination: dict[str, tuple[dict[str, float], str]] = {}

    def keys_and_args(self) -> tuple[list[str], list[Any]]:
        keys = self.keys
        return (
            [
                exporter_lease_key(keys),
                keys.dead_letters,
                keys.metrics,
                *(
                    key
                    for d in self.destinations
                    for key in (
                        d.rq_queue,
                        d.rq_workers,
                        d.rq_deferred,
                        d.retry_schedule,
                        rqstore.started_key(d.queue_name),
                        d.destination_state,
                    )
                ),
            ],
            [self.lease_id, METRICS_LEASE_SECONDS * 1000, rqstore.JOB_PREFIX, OLDEST_SCAN],
        )

    def update(self, answer: list[Any]) -> None:
        """Take the script's answer; on an error (Redis gone) call `lost()` instead."""
        self.held = bool(answer and int(answer[0]))
        if not self.held:
            return
        _, depth, dead, alive, flat, per = answer
        self.gauges = {
            "intergiro_queue_depth": float(depth),
            "intergiro_dead_letter_depth": float(dead),
            "intergiro_workers_alive": float(alive),
        }
        now = time.time()
        self.per_destination = {}
        for d, (queued, workers, waiting, retrying, in_flight, state, oldest) in zip(
            self.destinations, per, strict=True
        ):
            self.per_destination[d.destination] = (
                {
                    "intergiro_destination_queued": float(queued),
                    "intergiro_destination_workers_alive": float(workers),
                    "intergiro_destination_waiting": float(waiting),
                    "intergiro_destination_retrying": float(retrying),
                    "intergiro_destination_in_flight": float(in_flight),
                    "intergiro_oldest_undelivered_seconds": _age(oldest, now),
                },
                state.decode() if isinstance(state, bytes) else str(state),
            )
        pairs = zip(flat[::2], flat[1::2], strict=True)
        self.snapshot = {
            (k.decode() if isinstance(k, bytes) else k): float(v.decode() if isinstance(v, bytes) else v)
            for k, v in pairs
        }

    def memory(self, info: Mapping[str, Any]) -> None:
        """Take Redis's `INFO memory` (read only while the lease is held)."""
        self.gauges["intergiro_redis_memory_used_bytes"] = float(info.get("used_memory", 0))
        self.gauges["intergiro_redis_memory_max_bytes"] = float(info.get("maxmemory", 0))

    def lost(self) -> None:
        """Redis did not answer: serve nothing of the deployment's (another process may hold the lease
        by the time this one learns it lost it); the alerts see the gap."""
        self.held = False

    def collect(self) -> Iterable[Any]:
        if not self.held:
            return
        for name, help_text in DEPLOYMENT_GAUGES.items():
            gauge = GaugeMetricFamily(name, help_text)
            gauge.add_metric([], self.gauges.get(name, 0.0))
            yield gauge
        for name, help_text in DESTINATION_GAUGES.items():
            gauge = GaugeMetricFamily(name, help_text, labels=["destination"])
            for destination, (figures, _) in self.per_destination.items():
                gauge.add_metric([destination], figures[name])
            yield gauge
        states = GaugeMetricFamily(
            "intergiro_destination_state", "1 for the destination's state (up, down, paused), 0 for the others.",
            labels=["destination", "state"],
        )  # fmt: skip
        for destination, (_, state) in self.per_destination.items():
            for name in ("up", "down", "paused"):
                states.add_metric([destination, name], 1.0 if name == state else 0.0)
        yield states
        parsed: dict[str, list[tuple[dict[str, str], float]]] = {}
        for field, value in self.snapshot.items():
            name, *pairs = field.split("|")
            labels = dict(pair.split("=", 1) for pair in pairs)
            parsed.setdefault(name, []).append((labels, value))
        for name, (kind, help_text, label_names) in SHARED_METRICS.items():
            if kind == "counter":
                family: Any = CounterMetricFamily(name, help_text, labels=label_names)
                for labels, value in parsed.get(name, []):
                    family.add_metric([labels.get(n, "") for n in label_names], value)
            elif kind == "gauge":
                family = GaugeMetricFamily(name, help_text, labels=label_names)
                for labels, value in parsed.get(name, []):
                    family.add_metric([labels.get(n, "") for n in label_names], value)
            else:
                family = HistogramMetricFamily(name, help_text, labels=label_names)
                groups: dict[tuple[str, ...], dict[str, Any]] = {}
                for labels, value in parsed.get(name + "_in_bucket", []):
                    key = tuple(labels.get(n, "") for n in label_names)
                    groups.setdefault(key, {"buckets": {}, "sum": 0.0})["buckets"][labels["le"]] = value
                for labels, value in parsed.get(name + "_sum", []):
                    key = tuple(labels.get(n, "") for n in label_names)
                    groups.setdefault(key, {"buckets": {}, "sum": 0.0})["sum"] = value
                for key, group in groups.items():
                    bounds = [str(b) for b in LATENCY_BUCKETS] + ["+Inf"]
                    counts = itertools.accumulate(group["buckets"].get(b, 0.0) for b in bounds)
                    family.add_metric(list(key), list(zip(bounds, counts, strict=True)), group["sum"])
            # `merchant`'s series carry no destination label: a deployment without fan-out keeps its own
            family.samples = [
                s._replace(labels={k: v for k, v in s.labels.items() if k != "destination" or v})
                for s in family.samples
            ]
            yield family


class CallbackMinutes:
    """Callbacks per minute by outcome, for the ops console: counted in memory per process and added to
    one Redis hash per minute (summed over every process) by `flush` every few seconds, so counting
    costs a callback no round trip; a process that stops loses its last few seconds' counts (a
    final flush on the way out could hang a stop while Redis fails over). (The order histories hold
    verified callbacks only, spread over one key per order: no way to count rejections, nor cheap to
    read.)"""

    def __init__(self) -> None:
        self.pending: dict[tuple[int, str], int] = {}

    def count(self, outcome: str) -> None:
        key = (int(time.time()) // 60, outcome)
        self.pending[key] = self.pending.get(key, 0) + 1

    async def flush(self, redis: Any, keys: RedisKeys) -> None:
        """Add what was counted since the last flush (kept for the next one when Redis fails)."""
        if not self.pending:
            return
        taken, self.pending = self.pending, {}
        try:
            async with redis.pipeline(transaction=False) as pipe:
                for (minute, outcome), amount in taken.items():
                    pipe.hincrby(keys.callback_minute(minute), outcome, amount)
                    pipe.expire(keys.callback_minute(minute), CALLBACK_MINUTES_KEPT * 60)
                await pipe.execute()
        except Exception:  # Redis failed: count them next time
            oldest = int(time.time()) // 60 - CALLBACK_MINUTES_KEPT
            for key, amount in taken.items():
                if key[0] > oldest:
                    self.pending[key] = self.pending.get(key, 0) + amount
            raise


def _proc_stat(pid: int) -> list[str]:
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()


class ProcessGroupMetrics(Collector):
    """`process_*` of a parent and its children together (`serve --processes N`, `worker --processes
    N`): CPU and memory add up over the group, so a pod's figure is one series, whichever process
    answers the scrape. Linux only (/proc); nothing elsewhere."""

    def __init__(self, root_pid: int) -> None:
        self.root_pid = root_pid
        self.ticks = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
        self.page = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096

    def pids(self) -> list[int]:
        try:
            path = f"/proc/{self.root_pid}/task/{self.root_pid}/children"
            return [self.root_pid, *(int(p) for p in Path(path).read_text().split())]
        except OSError:
            return []

    def collect(self) -> Iterable[Any]:
        cpu = rss = fds = 0.0
        pids = self.pids()
        if not pids:
            return
        for pid in pids:
            try:
                stat = _proc_stat(pid)
                cpu += (int(stat[11]) + int(stat[12])) / self.ticks
                rss += int(stat[21]) * self.page
                fds += len(os.listdir(f"/proc/{pid}/fd"))
            except (OSError, IndexError, ValueError):
                continue  # a child that just ended
        yield CounterMetricFamily(
            "process_cpu_seconds", "User and system CPU of the process group, in seconds.", value=cpu
        )
        yield GaugeMetricFamily("process_resident_memory_bytes", "Resident memory of the process group.", rss)
        yield GaugeMetricFamily("process_open_fds", "Open file descriptors of the process group.", fds)
        yield GaugeMetricFamily("process_group_processes", "Processes in the group.", len(pids))
        try:
            boot = next(
                float(line.split()[1])
                for line in Path("/proc/stat").read_text().splitlines()
                if line.startswith("btime")
            )
            start = boot + int(_proc_stat(self.root_pid)[19]) / self.ticks
            yield GaugeMetricFamily(
                "process_start_time_seconds", "Start of the group's first process (Unix time).", start
            )
        except (OSError, StopIteration, IndexError, ValueError):
            pass


def process_collectors(registry: CollectorRegistry, group_root: int | None = None) -> None:
    """This process's own `process_*`, `python_gc_*` and `python_info`; or, for a group of forked
    processes, the group's `process_*` summed (see ProcessGroupMetrics)."""
    if group_root is None:
        for collector in (PROCESS_COLLECTOR, PLATFORM_COLLECTOR, GC_COLLECTOR):
            registry.register(collector)
    else:
        registry.register(ProcessGroupMetrics(group_root))
        registry.register(PLATFORM_COLLECTOR)


def multiprocess_dir() -> str | None:
    """prometheus_client's multiprocess folder, when `serve --processes N` set one up (its own
    variable, read by prometheus_client at import: not one of the product's settings)."""
    return os.environ.get("PROMETHEUS_MULTIPROC_DIR") or None


class ReceiverMetrics:
    def __init__(self, keys: RedisKeys | None = None, destinations: Sequence[RedisKeys] = ()) -> None:
        keys = keys or RedisKeys()
        self.registry = CollectorRegistry()
        self.callbacks = Counter(
            "intergiro_callbacks_total",
            "Callbacks received, by outcome.",
            ["outcome"],
            registry=self.registry,
        )
        self.updates_queued = Counter(
            "intergiro_updates_queued_total", "Order-status updates queued.", registry=self.registry
        )
        self.error_objects = Counter(
            "intergiro_error_objects_total",
            "Intergiro Error objects received as callbacks.",
            registry=self.registry,
        )
        self.error_notes_dropped = Counter(
            "intergiro_error_notes_dropped_total",
            "Notes of Intergiro Error objects pushed out of the bounded list by newer ones.",
            registry=self.registry,
        )
        self.connections_refused = Counter(
            "intergiro_connections_refused_total",
            "Connections answered 503 at once because the process had RECEIVER_MAX_CONNECTIONS open.",
            registry=self.registry,
        )
        self.redis_refusals = Counter(
            "intergiro_redis_write_refusals_total",
            "Writes a reachable Redis refused (out of memory, read-only, script error), by reason; each "
            "callback concerned was answered 503 and nothing of it kept.",
            ["reason"],
            registry=self.registry,
        )
        self.verification_seconds = Histogram(
            "intergiro_verification_seconds",
            "Time to verify one callback, by method.",
            ["method"],
            buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
            registry=self.registry,
        )
        self.deployment = DeploymentMetrics(keys, destinations)
        self.registry.register(self.deployment)
        shared_folder = multiprocess_dir()
        if shared_folder is None:
            process_collectors(self.registry)
            self.served = self.registry
        else:  # `serve --processes N`: every process's counts, from the shared files, whoever answers
            from prometheus_client import multiprocess

            self.served = CollectorRegistry()
            multiprocess.MultiProcessCollector(self.served, path=shared_folder)  # type: ignore[no-untyped-call]
            self.served.register(self.deployment)
            process_collectors(self.served, group_root=os.getppid())
        self.minutes = CallbackMinutes()
        self._children: dict[tuple[int, str], Any] = {}

    def _child(self, metric: Counter | Histogram, label: str) -> Any:
        """The labelled child, looked up once (`labels()` takes a lock and builds a key every call);
        made on first use, so a series still appears only once it has happened."""
        key = (id(metric), label)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(label)
        return child

    def count_callback(self, outcome: str) -> None:
        self._child(self.callbacks, outcome).inc()
        self.minutes.count(outcome)

    def observe_verification(self, method: str, seconds: float) -> None:
        self._child(self.verification_seconds, method).observe(seconds)

    def render(self) -> bytes:
        """The Prometheus text of what this process serves."""
        return generate_latest(self.served)

"""Prometheus metrics.

The receiver's own metrics live in a registry per app. Metrics of other processes (workers,
reconcile) are kept in one Redis hash so that any number of processes on any number of hosts add up,
and the receiver's `/metrics` serves them: Prometheus scrapes one place.
"""

from __future__ import annotations

import bisect
import itertools
import time
from collections.abc import Iterable, Mapping
from functools import cache
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector

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


class SharedMetrics(Collector):
    """Renders a snapshot of the shared Redis hash as Prometheus metric families."""

    def __init__(self) -> None:
        self.snapshot: dict[str, float] = {}

    def update(self, raw: Mapping[bytes | str, bytes | str]) -> None:
        self.snapshot = {
            (k.decode() if isinstance(k, bytes) else k): float(v.decode() if isinstance(v, bytes) else v)
            for k, v in raw.items()
        }

    def collect(self) -> Iterable[Any]:
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


class ReceiverMetrics:
    def __init__(self) -> None:
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
        self.verification_seconds = Histogram(
            "intergiro_verification_seconds",
            "Time to verify one callback, by method.",
            ["method"],
            buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
            registry=self.registry,
        )
        self.queue_depth = Gauge(
            "intergiro_queue_depth", "Updates waiting in the RQ queue.", registry=self.registry
        )
        self.dead_letter_depth = Gauge(
            "intergiro_dead_letter_depth", "Updates in the dead-letter queue.", registry=self.registry
        )
        self.workers_alive = Gauge(
            "intergiro_workers_alive",
            "RQ workers listening on the queue whose heartbeat has not expired.",
            registry=self.registry,
        )
        self.minutes = CallbackMinutes()
        self.shared = SharedMetrics()
        self.registry.register(self.shared)
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

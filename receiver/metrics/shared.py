"""The metrics shared through Redis: workers and reconcile count into one hash (`RedisKeys.metrics`),
in the same step as the change they count, so a count survives restarts and is never lost or doubled.
This module owns the hash's format: its fields (`name|label=value|...`) are written here (or by a
script given `counter_increment`'s fields) and read back into metric families here."""

from __future__ import annotations

import bisect
import itertools
from collections.abc import Iterable, Iterator, Mapping
from functools import cache
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.metrics_core import Metric

from receiver.rediskeys import RedisKeys

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


def shared_families(snapshot: Mapping[str, float]) -> Iterator[Metric]:
    """The shared metrics of one read of the hash (field -> value), as metric families."""
    parsed: dict[str, list[tuple[dict[str, str], float]]] = {}
    for field, value in snapshot.items():
        name, *pairs = field.split("|")
        labels = dict(pair.split("=", 1) for pair in pairs)
        parsed.setdefault(name, []).append((labels, value))
    bounds = [str(b) for b in LATENCY_BUCKETS] + ["+Inf"]
    for name, (kind, help_text, label_names) in SHARED_METRICS.items():
        family = _Family(kind, name, help_text, label_names)
        if kind != "histogram":
            for labels, value in parsed.get(name, []):
                family.add(labels, value)
            yield family.served()
            continue
        groups: dict[tuple[str, ...], dict[str, Any]] = {}
        for labels, value in parsed.get(name + "_in_bucket", []):
            key = tuple(labels.get(n, "") for n in label_names)
            groups.setdefault(key, {"buckets": {}, "sum": 0.0})["buckets"][labels["le"]] = value
        for labels, value in parsed.get(name + "_sum", []):
            key = tuple(labels.get(n, "") for n in label_names)
            groups.setdefault(key, {"buckets": {}, "sum": 0.0})["sum"] = value
        for key, group in groups.items():
            counts = itertools.accumulate(group["buckets"].get(b, 0.0) for b in bounds)
            family.add_histogram(
                dict(zip(label_names, key, strict=True)), list(zip(bounds, counts, strict=True)), group["sum"]
            )
        yield family.served()


class _Family:
    """One shared metric's series. `merchant`'s carry no destination label (a deployment without
    fan-out keeps its own series), so the series are made in one family per set of label names, each
    through prometheus_client's add_metric, and served as one."""

    KINDS: dict[str, Any] = {
        "counter": CounterMetricFamily,
        "gauge": GaugeMetricFamily,
        "histogram": HistogramMetricFamily,
    }

    def __init__(self, kind: str, name: str, help_text: str, label_names: tuple[str, ...]) -> None:
        self.kind, self.name, self.help_text = kind, name, help_text
        self.label_names = label_names
        self.by_names: dict[tuple[str, ...], Any] = {}

    def make(self, names: tuple[str, ...]) -> Any:
        return self.KINDS[self.kind](self.name, self.help_text, labels=names)

    def _for(self, labels: Mapping[str, str]) -> tuple[Any, list[str]]:
        names = tuple(n for n in self.label_names if n != "destination" or labels.get(n))
        if names not in self.by_names:
            self.by_names[names] = self.make(names)
        return self.by_names[names], [labels.get(n, "") for n in names]

    def add(self, labels: Mapping[str, str], value: float) -> None:
        family, values = self._for(labels)
        family.add_metric(values, value)

    def add_histogram(
        self, labels: Mapping[str, str], buckets: list[tuple[str, float]], total: float
    ) -> None:
        family, values = self._for(labels)
        family.add_metric(values, buckets, total)

    def served(self) -> Metric:
        families = list(self.by_names.values()) or [self.make(self.label_names)]
        for other in families[1:]:
            families[0].samples.extend(other.samples)
        served: Metric = families[0]
        return served

"""What a receiver process counts (callbacks, verification latency, refused connections) in its own
registry, and what it serves: its own counts (or, with `serve --processes N`, every process's, from
prometheus_client's multiprocess files), the deployment's figures while it holds the lease, and
`process_*`."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest

from receiver.metrics.exporter import DeploymentMetrics
from receiver.metrics.minutes import CallbackMinutes
from receiver.metrics.process_group import process_collectors
from receiver.rediskeys import RedisKeys


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

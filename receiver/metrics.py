"""Prometheus metrics of the receiver, in a registry of its own (one per app, so tests can run many)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram


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

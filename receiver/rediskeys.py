"""Every Redis key the product writes, in one place. Ours share a prefix (`REDIS_KEY_PREFIX`);
RQ's own keys (`rq:job:<id>`, `rq:queue:<name>`) keep RQ's names so RQ and rq-dashboard can read them."""

from __future__ import annotations

from dataclasses import dataclass

RQ_QUEUES = "rq:queues"


@dataclass(frozen=True)
class RedisKeys:
    prefix: str = "igr:"
    queue_name: str = "order-updates"

    def seen(self, order_id: str) -> str:
        """Hash of the order's seen event keys, kept DEDUP_TTL_SECONDS after its last callback."""
        return f"{self.prefix}seen:{order_id}"

    def order_head(self, order_id: str) -> str:
        """The update of this order now queued or retrying; later updates wait behind it."""
        return f"{self.prefix}order:{order_id}:head"

    def order_waiting(self, order_id: str) -> str:
        """List of this order's update ids waiting for the head to be delivered, in event order."""
        return f"{self.prefix}order:{order_id}:waiting"

    @property
    def error_notes(self) -> str:
        """Capped list of Intergiro Error objects received as callbacks, newest first, for ops."""
        return f"{self.prefix}error-notes"

    @property
    def dead_letters(self) -> str:
        """Hash of dead-lettered updates: update id -> JSON entry (update, attempts, last error, time)."""
        return f"{self.prefix}dlq"

    @property
    def metrics(self) -> str:
        """Hash of metrics shared by every process (see receiver.metrics)."""
        return f"{self.prefix}metrics"

    @property
    def reconcile_lock(self) -> str:
        """Deployment-wide lock of periodic reconcile: a random token, with an expiry renewed while it runs."""
        return f"{self.prefix}reconcile:lock"

    @property
    def reconcile_watermark(self) -> str:
        """Unix time (seconds) of the end of the last window periodic reconcile completed."""
        return f"{self.prefix}reconcile:watermark"

    @property
    def rq_queue(self) -> str:
        return f"rq:queue:{self.queue_name}"

    @property
    def rq_workers(self) -> str:
        """RQ's set of the workers listening on the queue (a member is alive while its key exists)."""
        return f"rq:workers:{self.queue_name}"

    @staticmethod
    def rq_job(job_id: str) -> str:
        return f"rq:job:{job_id}"

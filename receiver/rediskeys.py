"""Every Redis key the product writes, in one place. Ours share a prefix (`REDIS_KEY_PREFIX`);
RQ's own keys keep RQ's names (taken from RQ's classes in receiver/rqstore.py) so RQ and rq-dashboard
can read them."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from receiver import rqstore
from receiver.destinations import MERCHANT, job_id, queue_name

if TYPE_CHECKING:
    from receiver.settings import Settings


@dataclass(frozen=True)
class RedisKeys:
    """The keys of one destination's deliveries (`merchant`'s unless made by `for_destination`) and the
    keys every destination shares (dedup, dead letters, history, metrics). `queue_name` is the
    destination's RQ queue."""

    prefix: str = "igr:"
    queue_name: str = "order-updates"
    destination: str = MERCHANT

    @classmethod
    def of(cls, settings: Settings) -> RedisKeys:
        """`merchant`'s keys under the settings' REDIS_KEY_PREFIX and QUEUE_NAME."""
        return cls(settings.redis_key_prefix, settings.queue_name)

    def for_destination(self, name: str) -> RedisKeys:
        """The keys of destination `name` (from `merchant`'s, whose queue is QUEUE_NAME): these keys
        themselves for `merchant`."""
        assert self.destination == MERCHANT, "made from merchant's keys only"
        if name == MERCHANT:
            return self
        return replace(self, destination=name, queue_name=queue_name(self.queue_name, name))

    @property
    def _own(self) -> str:
        """Where this destination's chain keys live: `merchant`'s where they were before fan-out."""
        return self.prefix if self.destination == MERCHANT else f"{self.prefix}dest:{self.destination}:"

    def job_id(self, update_id: str) -> str:
        """The RQ job id of the update's delivery to this destination (the update id for `merchant`)."""
        return job_id(update_id, self.destination)

    @property
    def destinations(self) -> str:
        """Set of the destination names the workers last ran with: one gone from the configuration has
        its pending deliveries dead-lettered."""
        return f"{self.prefix}destinations"

    def seen(self, order_id: str) -> str:
        """Hash of the order's seen event keys, kept DEDUP_TTL_SECONDS after its last callback."""
        return f"{self.prefix}seen:{order_id}"

    def order_head(self, order_id: str) -> str:
        """The update of this order now queued or retrying; later updates wait behind it."""
        return f"{self._own}order:{order_id}:head"

    def order_waiting(self, order_id: str) -> str:
        """List of this order's update ids waiting for the head to be delivered, in event order."""
        return f"{self._own}order:{order_id}:waiting"

    @property
    def active_orders(self) -> str:
        """Set of order ids that have a head: the workers sweep it for heads whose job is gone."""
        return f"{self._own}orders:active"

    def delivery(self, update_id: str) -> str:
        """Hash of one undelivered update's attempts: count, last error and its time, targets done."""
        return f"{self.prefix}delivery:{update_id}"

    @property
    def retry_schedule(self) -> str:
        """Sorted set of updates waiting for their next attempt: update id -> due time (Unix seconds, to
        the microsecond; RQ's ScheduledJobRegistry, which lists them too, keeps whole seconds)."""
        return f"{self._own}retry:due"

    @property
    def in_flight(self) -> str:
        """Sorted set of the leases on the destination's requests in flight, across every worker process
        and host: lease token -> when it lapses (Redis' clock, ms). receiver/inflight.py owns it."""
        return f"{self._own}in-flight"

    @property
    def replay_lock(self) -> str:
        """The lock of the destination's running `replay` (a redis-py Lock): one at a time."""
        return f"{self._own}replay-lock"

    @property
    def replay_last(self) -> str:
        """JSON of the destination's last (or running) `replay`, by the CLI or the console: what it was
        asked, by whom, and its summary once it ended (receiver/replay.py)."""
        return f"{self._own}replay-last"

    @property
    def destination_state(self) -> str:
        """Hash of the destination's state, shared by every process: paused (when, why, by whom) and the
        breaker's (consecutive failures, down since, next probe). receiver/destination_state.py owns it."""
        return f"{self.prefix}destination-state:{self.destination}"

    @property
    def destination_probe(self) -> str:
        """The one probe delivery allowed in flight while the destination is down: a token that lapses
        after one attempt's time. receiver/destination_state.py owns it."""
        return f"{self.prefix}destination-probe:{self.destination}"

    @property
    def pending_updates(self) -> str:
        """Hash of every update not yet finished: update id -> the update (JSON). RQ's job holds it too;
        this copy is what puts an update whose job was deleted from outside into the dead-letter queue."""
        return f"{self.prefix}updates"

    @property
    def error_notes(self) -> str:
        """Capped list of Intergiro Error objects received as callbacks, newest first, for ops."""
        return f"{self.prefix}error-notes"

    @property
    def dead_letters(self) -> str:
        """Hash of dead-lettered updates: update id -> JSON entry (update, attempts, last error, time)."""
        return f"{self.prefix}dlq"

    def history(self, order_id: str) -> str:
        """List of the order's history entries (receiver/history.py), kept HISTORY_RETENTION_SECONDS."""
        return f"{self.prefix}history:{order_id}"

    def history_number(self, number: str) -> str:
        """The ids of the orders that carry this merchant order number, comma-separated, kept as long as
        their history."""
        return f"{self.prefix}history:number:{number}"

    def callback_minute(self, minute: int) -> str:
        """Hash of one minute's callbacks (Unix minute): outcome -> count, summed over every receiver
        process and kept CALLBACK_MINUTES_KEPT minutes, for the ops console's overview."""
        return f"{self.prefix}callbacks:minute:{minute}"

    def ops_sign_in_link(self, nonce: str) -> str:
        """A one-time sign-in link of the ops console (made by `dev`), deleted when used or expired."""
        return f"{self.prefix}ops:sign-in:{nonce}"

    def ops_session_ended(self, nonce: str) -> str:
        """An ops console session ended by signing out, kept until the session would have expired."""
        return f"{self.prefix}ops:session-ended:{nonce}"

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
        return rqstore.queue_key(self.queue_name)

    @property
    def rq_workers(self) -> str:
        """RQ's set of the keys of the workers listening on the queue (alive while that key exists)."""
        return rqstore.workers_key(self.queue_name)

    @property
    def rq_deferred(self) -> str:
        return rqstore.deferred_key(self.queue_name)

    @property
    def rq_scheduled(self) -> str:
        return rqstore.scheduled_key(self.queue_name)

    @property
    def rq_failed(self) -> str:
        return rqstore.failed_key(self.queue_name)

    @staticmethod
    def rq_job(job_id: str) -> str:
        return rqstore.job_key(job_id)


def configured_destination_keys(settings: Settings) -> list[RedisKeys]:
    """The keys of every destination the settings configure."""
    return destination_keys(RedisKeys.of(settings), [d.name for d in settings.destinations])


def destination_keys(keys: RedisKeys, names: Sequence[str]) -> list[RedisKeys]:
    """The keys of every named destination (`merchant`'s are `keys` themselves); `keys` alone for none."""
    return [keys.for_destination(name) for name in names] or [keys]

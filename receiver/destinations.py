"""Destinations: the downstream systems each update is delivered to, and the filters that pick theirs.

Every destination has its own per-order chain, RQ queue, retry schedule, attempt counts and dead
letters (receiver/chains.py, per destination); the intake queues one delivery per (update, matching
destination) in its one atomic step. The `MERCHANT_*` settings are the destination `merchant`, whose
Redis keys, RQ queue (`QUEUE_NAME`) and job ids (the update id) are exactly those of a deployment
without fan-out; another destination NAME has the queue `<QUEUE_NAME>.<NAME>`, job ids
`<update id>__<NAME>` and its chain keys under `<prefix>dest:<NAME>:`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from receiver.retries import DAY_SCHEDULE

MERCHANT = "merchant"
NAME_PATTERN = r"[a-z0-9-]{1,40}"
JOB_ID_SEPARATOR = "__"  # RQ allows letters, digits, _ and - in job ids; names have no _
# `worker` processes per destination unless told otherwise, chosen with bench/e2e in the production Redis
# configuration (docs/performance.md has the runs): two held rates at which one fell behind, and with
# two, a slow disk flush or a slow answer of the destination holds one process while the other goes on.
# A process mostly waits (for Redis' disk, for the destination), so cores are no guide, and
# os.cpu_count() in a container counts the host's.
PROCESSES_PER_DESTINATION = 2
# Deliveries one worker process keeps in flight at once (DELIVERY_CONCURRENCY), each on a thread of its
# own. A delivery mostly waits for the destination's answer (100-300 ms for a shop backend), so one at a
# time caps a process at a few updates a second; bench/e2e --merchant-ms (docs/performance.md) chose it:
# two processes of 32 hold several hundred updates/s against a merchant answering in 100 ms, and more
# threads buy nothing once the worker's CPU is the bound, only memory and open connections.
DELIVERY_CONCURRENCY = 32
MAX_CONCURRENCY = 256
# Requests open at once to one destination across every worker process and host (MERCHANT_MAX_IN_FLIGHT,
# DESTINATION_<NAME>_MAX_IN_FLIGHT): what the default deployment keeps in flight (2 processes x 32), so
# it is never the limit out of the box, while adding worker pods never floods a merchant beyond it.
MAX_IN_FLIGHT = 64
# Entries a stream destination keeps (DESTINATION_<NAME>_STREAM_MAXLEN), trimmed approximately (Redis'
# `MAXLEN ~`): a day of a busy shop (a few updates a second) with room to spare, at about 1 KiB an entry.
STREAM_MAXLEN = 1_000_000


@dataclass(frozen=True)
class Breaker:
    """When a destination counts as down, and how often it is probed then (BREAKER_* settings; the
    state is receiver/destination_state.py's)."""

    # Attempts in a row that found it unreachable (refused, timed out, 502/503/504) before it is marked
    # down: more than a blip (a restart drops a few connections; with 64 in flight, a few fail at once),
    # few enough that an outage costs the merchant a handful of requests, not a backlog's worth.
    failures: int = 10
    # The first wait between probes, doubling after each failed probe: a quick restart is found quickly.
    probe_seconds: float = 5.0
    # The longest wait: a merchant back from a long outage waits at most a minute for its backlog, and a
    # probe a minute costs a merchant that is down nothing.
    max_probe_seconds: float = 60.0


@dataclass(frozen=True)
class Destination:
    """One downstream system: a signed webhook and/or a Python handler, or a Redis Stream, with optional
    filters on the update's event type and status (empty: every update), and its own delivery settings."""

    name: str
    url: str = field(default="", repr=False)  # may hold Basic auth credentials
    secret: str = field(default="", repr=False)
    handler: str = ""
    stream: str = ""  # a Redis Stream's key in the same Redis, instead of a URL or handler
    stream_maxlen: int = STREAM_MAXLEN
    events: frozenset[str] = frozenset()
    statuses: frozenset[str] = frozenset()
    timeout_seconds: float = 10.0
    max_attempts: int = len(DAY_SCHEDULE) + 1
    retry_schedule: tuple[float, ...] = DAY_SCHEDULE  # the waits after attempts 1, 2, ... (retries.py)
    backoff_seconds: float | None = None  # an exponential backoff's base instead of the schedule
    max_in_flight: int = MAX_IN_FLIGHT
    tls_client_cert: str = ""
    tls_client_key: str = ""
    http_proxy: str = field(default="", repr=False)
    https_proxy: str = field(default="", repr=False)
    no_proxy: str = ""

    def matches(self, update: Mapping[str, Any]) -> bool:
        """Whether the update passes this destination's filters."""
        if self.events and update["event"]["type"] not in self.events:
            return False
        return not self.statuses or update["status"] in self.statuses

    @property
    def configured(self) -> bool:
        """Whether there is something to deliver to (a URL, a handler or a stream)."""
        return bool(self.url or self.handler or self.stream)

    @property
    def label(self) -> dict[str, str]:
        """The metrics label of its deliveries: none for `merchant`, so a deployment without fan-out
        keeps its series exactly."""
        return {} if self.name == MERCHANT else {"destination": self.name}


def job_id(update_id: str, destination: str) -> str:
    """The RQ job id (and chain member) of one update's delivery to one destination."""
    return update_id if destination == MERCHANT else f"{update_id}{JOB_ID_SEPARATOR}{destination}"


def split_job_id(delivery_id: str) -> tuple[str, str]:
    """(update id, destination) of a delivery's job id."""
    update_id, separator, destination = delivery_id.rpartition(JOB_ID_SEPARATOR)
    return (update_id, destination) if separator else (delivery_id, MERCHANT)


def queue_name(base: str, destination: str) -> str:
    """The destination's RQ queue: QUEUE_NAME for `merchant`, `<QUEUE_NAME>.<name>` for the others."""
    return base if destination == MERCHANT else f"{base}.{destination}"

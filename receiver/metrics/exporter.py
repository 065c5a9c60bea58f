"""The deployment-wide figures (the shared counters, queue depths, dead letters, workers alive, each
destination's state), served by exactly one of the processes being scraped: the holder of a short
Redis lease, renewed by each of its scrapes (receivers and the workers' metrics servers compete for
it). Another process takes over within METRICS_LEASE_SECONDS when the holder stops being scraped."""

from __future__ import annotations

import os
import socket
import time
import uuid
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime
from typing import Any

from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from receiver import rqstore
from receiver.metrics.shared import shared_families
from receiver.rediskeys import RedisKeys
from receiver.redistext import text

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
    at = text(created_at)
    try:
        return max(0.0, now - datetime.fromisoformat(at.replace("Z", "+00:00")).timestamp()) if at else 0.0
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
                text(state),
            )
        pairs = zip(flat[::2], flat[1::2], strict=True)
        self.snapshot = {text(k): float(text(v)) for k, v in pairs}

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
        yield from shared_families(self.snapshot)

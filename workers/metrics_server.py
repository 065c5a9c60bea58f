"""The workers' own HTTP endpoint, on WORKER_METRICS_PORT, so they are watched without a receiver:

- `GET /metrics`: the worker processes' `process_*` metrics and, while this process holds the
  exporter lease, the deployment-wide figures (see receiver.metrics: each counts once however many
  receivers and workers are scraped);
- `GET /healthz`: 200 while every worker process of this group has a live RQ heartbeat (its
  `rq:worker:*` key, which RQ lets expire when heartbeats stop), 503 once one has none past the
  start grace: the liveness probe restarts a worker that hangs. Redis not answering is not the
  worker's fault: 200 (the receivers' /readyz tells).

It runs in a thread of the process that starts the workers (the parent, with `--processes N`).
"""

from __future__ import annotations

import os
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import orjson
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from redis.exceptions import RedisError

from receiver.connections import sync_redis
from receiver.logs import log
from receiver.metrics.exporter import DEPLOYMENT_SCRIPT, DeploymentMetrics
from receiver.metrics.process_group import process_collectors
from receiver.rediskeys import RedisKeys, configured_destination_keys
from receiver.settings import Settings

START_GRACE_SECONDS = 90.0  # RQ registers a worker within seconds of its start; leave room for a slow one


class WorkerProbe:
    """What the endpoint reads: the deployment's figures (under the lease) and this group's heartbeats."""

    def __init__(self, settings: Settings, processes: int) -> None:
        self.keys = RedisKeys.of(settings)
        self.redis = sync_redis(settings, timeout=settings.redis_timeout_seconds)
        self.deployment = DeploymentMetrics(self.keys, configured_destination_keys(settings))
        self.script = self.redis.register_script(DEPLOYMENT_SCRIPT)
        self.registry = CollectorRegistry()
        process_collectors(self.registry, group_root=os.getpid() if processes > 1 else None)
        self.registry.register(self.deployment)
        self.processes = processes
        self.started = time.monotonic()
        self.hostname = socket.gethostname()

    def metrics(self) -> bytes:
        keys, args = self.deployment.keys_and_args()
        try:
            self.deployment.update(self.script(keys=keys, args=args))
            if self.deployment.held:
                self.deployment.memory(self.redis.info("memory"))
        except RedisError:
            self.deployment.lost()
        return generate_latest(self.registry)

    def group_pids(self) -> set[int]:
        pid = os.getpid()
        try:
            children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
        except OSError:
            children = []
        return {pid, *(int(c) for c in children)}

    def health(self) -> tuple[int, dict[str, Any]]:
        try:
            names: set[bytes] = set()
            for keys in self.deployment.destinations:  # every destination's queue (fan-out)
                names |= self.redis.smembers(keys.rq_workers)  # type: ignore[arg-type]
            with self.redis.pipeline(transaction=False) as pipe:
                for name in names:
                    pipe.hmget(name, "hostname", "pid")
                answers = pipe.execute()
        except RedisError:
            return 200, {"status": "unknown", "redis": "not reachable"}
        pids = self.group_pids()
        alive = sum(
            1
            for hostname, pid in answers
            if hostname is not None and hostname.decode() == self.hostname and pid and int(pid) in pids
        )
        body = {"workers_alive": alive, "workers_expected": self.processes}
        if alive >= self.processes or time.monotonic() - self.started < START_GRACE_SECONDS:
            return 200, {"status": "ok", **body}
        return 503, {"status": "heartbeat stopped", **body}


def start_metrics_server(settings: Settings, processes: int) -> ThreadingHTTPServer | None:
    """Serve /metrics and /healthz on WORKER_METRICS_PORT in a daemon thread; None when the port is 0."""
    if not settings.worker_metrics_port:
        return None
    probe = WorkerProbe(settings, processes)

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            if self.path == "/metrics":
                status, body, content_type = 200, probe.metrics(), CONTENT_TYPE_LATEST
            elif self.path == "/healthz":
                status, document = probe.health()
                body, content_type = orjson.dumps(document), "application/json"
            else:
                status, body, content_type = 404, b"not found\n", "text/plain"
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            pass  # scrapes and probes every few seconds: not worth a log line each

    try:
        server = ThreadingHTTPServer(("0.0.0.0", settings.worker_metrics_port), Handler)  # noqa: S104 - scraped from outside
    except OSError as exc:  # the deliveries matter more than their metrics: work on, say so loudly
        log.error("worker metrics not served", port=settings.worker_metrics_port, error=str(exc))
        return None
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, name="worker-metrics", daemon=True).start()
    log.debug("worker metrics listening", port=settings.worker_metrics_port)
    return server

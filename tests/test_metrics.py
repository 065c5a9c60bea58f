"""Metrics summed over every process a deployment runs give its true figures, each exactly once."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from prometheus_client.parser import text_string_to_metric_families

from receiver.metrics.exporter import exporter_lease_key
from receiver.rediskeys import RedisKeys
from receiver.settings import Settings
from tests.conftest import pem_public
from tests.helpers import card_order, token
from tests.processes import free_port, start_server, stop

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scrape(url: str) -> Samples:
    with urllib.request.urlopen(url, timeout=10) as answer:
        text = answer.read().decode()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def total(scrapes: list[Samples], name: str, **labels: str) -> float:
    wanted = tuple(sorted(labels.items()))
    return sum(s.get((name, wanted), 0.0) for s in scrapes)


class Deployment:
    """Real processes against one Redis: `serve`s and a `worker` with its metrics endpoint."""

    def __init__(self, redis_url: str, tmp_path: Path, key_file: Path) -> None:
        (tmp_path / "shop_hooks.py").write_text("def deliver(update):\n    pass\n")
        self.env = {
            **os.environ,
            "REDIS_URL": redis_url,
            "RECEIVER_HOST": "127.0.0.1",
            "INTERGIRO_PUBLIC_KEYS": f"@{key_file}",
            "MERCHANT_HANDLER": "shop_hooks:deliver",
            "PYTHONPATH": os.pathsep.join([str(tmp_path), *sys.path]),
        }
        self.tmp_path = tmp_path
        self.processes: dict[str, subprocess.Popen[bytes]] = {}

    def start(self, name: str, args: list[str], port: int, **env: str) -> None:
        log = self.tmp_path / f"{name}.log"
        environment = {**self.env, **env}
        self.processes[name] = start_server(*args, port=port, env=environment, log=log, cwd=self.tmp_path)

    def stop(self, name: str) -> None:
        stop(self.processes.pop(name), seconds=15)

    def stop_all(self) -> None:
        for name in list(self.processes):
            self.stop(name)


@pytest.fixture
def deployment(redis_url: str, tmp_path: Path, rsa_key: Any) -> Iterator[Deployment]:
    key_file = tmp_path / "key.pem"
    key_file.write_text(pem_public(rsa_key))
    running = Deployment(redis_url, tmp_path, key_file)
    yield running
    running.stop_all()


def test_two_receivers_and_a_worker_sum_to_the_true_figures_each_counted_once(
    deployment: Deployment, sync_redis: redis.Redis, rsa_key: Any
) -> None:
    ports = {name: free_port() for name in ("receiver-a", "receiver-b", "worker")}
    for name in ("receiver-a", "receiver-b"):
        deployment.start(name, ["serve"], ports[name], RECEIVER_PORT=str(ports[name]))
    worker = f"http://127.0.0.1:{ports['worker']}"
    deployment.start("worker", ["worker"], ports["worker"], WORKER_METRICS_PORT=str(ports["worker"]))
    sent = {"receiver-a": 3, "receiver-b": 2}
    number = 0
    for name, count in sent.items():
        for _ in range(count):
            number += 1
            request = urllib.request.Request(
                f"http://127.0.0.1:{ports[name]}/callbacks/intergiro",
                data=token(card_order(f"SumOrder{number:08d}"), rsa_key),
                headers={"Content-Type": "application/jwt"},
            )
            urllib.request.urlopen(request, timeout=10).close()
    deadline = time.monotonic() + 30
    urls = [f"http://127.0.0.1:{ports[n]}/metrics" for n in ("receiver-a", "receiver-b")] + [
        f"{worker}/metrics"
    ]
    while True:  # until the worker delivered all five
        scrapes = [scrape(url) for url in urls]
        if (
            total(scrapes, "intergiro_deliveries_total", outcome="delivered") == 5
            or time.monotonic() > deadline
        ):
            break
        time.sleep(0.2)
    assert total(scrapes, "intergiro_callbacks_total", outcome="accepted") == 5
    assert [s.get(("intergiro_callbacks_total", (("outcome", "accepted"),)), 0) for s in scrapes[:2]] == [
        3,
        2,
    ]
    assert total(scrapes, "intergiro_updates_queued_total") == 5
    assert total(scrapes, "intergiro_deliveries_total", outcome="delivered") == 5
    assert total(scrapes, "intergiro_delivery_attempts_total", result="success") == 5
    assert total(scrapes, "intergiro_workers_alive") == 2  # `worker` runs two processes by default
    assert total(scrapes, "intergiro_queue_depth") == 0
    exporting = [s for s in scrapes if ("intergiro_workers_alive", ()) in s]
    assert len(exporting) == 1  # the deployment's figures come from the lease holder alone
    for s in scrapes:
        assert s[("process_cpu_seconds_total", ())] > 0
        assert s[("process_resident_memory_bytes", ())] > 0
        assert s[("process_open_fds", ())] > 0
    # Without any receiver (and once the lease of the last holder expired), the worker serves them.
    deployment.stop("receiver-a")
    deployment.stop("receiver-b")
    sync_redis.delete(exporter_lease_key(RedisKeys()))
    alone = scrape(f"{worker}/metrics")
    assert alone[("intergiro_deliveries_total", (("outcome", "delivered"),))] == 5
    assert alone[("intergiro_workers_alive", ())] == 2
    with urllib.request.urlopen(f"{worker}/healthz", timeout=5) as answer:
        assert answer.status == 200
        assert json.loads(answer.read()) == {"status": "ok", "workers_alive": 2, "workers_expected": 2}


def test_the_worker_probe_fails_when_no_rq_heartbeat_of_its_processes_is_alive(
    redis_url: str, sync_redis: redis.Redis, monkeypatch: Any
) -> None:
    import socket

    from workers import metrics_server

    monkeypatch.setattr(metrics_server, "START_GRACE_SECONDS", 0.0)
    settings = Settings(redis_url=redis_url)
    probe = metrics_server.WorkerProbe(settings, processes=1)
    status, body = probe.health()
    assert (status, body["status"], body["workers_alive"]) == (503, "heartbeat stopped", 0)
    keys = RedisKeys()
    sync_redis.hset("rq:worker:mine", mapping={"hostname": socket.gethostname(), "pid": os.getpid()})
    sync_redis.sadd(keys.rq_workers, "rq:worker:mine")
    assert probe.health()[0] == 200
    sync_redis.delete("rq:worker:mine")  # RQ lets the key expire when the heartbeats stop
    assert probe.health()[0] == 503


def test_shared_metrics_serve_merchants_series_without_a_destination_label_beside_the_others_in_one_family(
    sync_redis: redis.Redis,
) -> None:
    from prometheus_client import CollectorRegistry, generate_latest

    from receiver.metrics.exporter import DEPLOYMENT_SCRIPT, DeploymentMetrics
    from receiver.metrics.shared import count, observe

    keys = RedisKeys()
    count(sync_redis, keys, "intergiro_deliveries_total", 2, outcome="delivered")
    count(sync_redis, keys, "intergiro_deliveries_total", 3, outcome="delivered", destination="erp")
    with sync_redis.pipeline() as pipe:
        observe(pipe, keys, "intergiro_delivery_seconds", 0.02)
        observe(pipe, keys, "intergiro_delivery_seconds", 0.2, destination="erp")
        pipe.execute()
    deployment = DeploymentMetrics(keys, [keys, keys.for_destination("erp")])
    lease_keys, args = deployment.keys_and_args()
    deployment.update(sync_redis.eval(DEPLOYMENT_SCRIPT, len(lease_keys), *lease_keys, *args))
    registry = CollectorRegistry()
    registry.register(deployment)
    lines = generate_latest(registry).decode().splitlines()
    assert lines.count("# TYPE intergiro_deliveries_total counter") == 1
    assert 'intergiro_deliveries_total{outcome="delivered"} 2.0' in lines
    assert 'intergiro_deliveries_total{destination="erp",outcome="delivered"} 3.0' in lines
    assert lines.count("# TYPE intergiro_delivery_seconds histogram") == 1
    assert 'intergiro_delivery_seconds_bucket{le="0.025"} 1.0' in lines
    assert 'intergiro_delivery_seconds_bucket{destination="erp",le="0.25"} 1.0' in lines
    assert 'intergiro_delivery_seconds_count{destination="erp"} 1.0' in lines
    assert "# TYPE intergiro_reconcile_runs_total counter" in lines  # not counted yet: described all the same
    families = {f.name: f for f in text_string_to_metric_families("\n".join(lines) + "\n")}
    assert len(families["intergiro_deliveries"].samples) == 2

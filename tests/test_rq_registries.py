"""What RQ's own tools show is the truth: an update waiting behind its order's head is deferred, one
waiting for its next attempt is scheduled, a dead-lettered one is failed, each in RQ's registry of that
name; a job deleted from outside (rq-dashboard's Delete, `rq empty`, Job.delete()) never makes an update
vanish; RQ's RQ_KEY_PREFIX works end to end. Real Redis, real worker and receiver processes."""

from __future__ import annotations

import asyncio
import json
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import redis
from rq import Queue
from rq.job import Job, JobStatus
from rq.serializers import JSONSerializer

from receiver.history import DELETED_OUTSIDE_REASON as DELETED_OUTSIDE
from receiver.rediskeys import RedisKeys
from tests.conftest import real_callbacks
from tests.merchant_handlers import DELIVERED
from tests.processes import ROOT, free_port, run_command, serve_env, start_command, stop, worker_env
from tests.sink import Sink, log_events, wait_for
from tests.test_workers import EVENTS, post_order, webhook_settings

KEYS = RedisKeys()


@pytest.fixture
def worker_log(tmp_path: Path) -> Path:
    return tmp_path / "worker.log"  # where the `workers` fixture's processes log


def status(client: redis.Redis, job_id: str) -> JobStatus | None:
    return Job.fetch(job_id, connection=client, serializer=JSONSerializer).get_status()


async def test_waiting_retrying_and_dead_lettered_updates_are_in_rqs_deferred_scheduled_and_failed_registries(
    receiver: Any, rsa_key: Any, sink: Sink, workers: Any, sync_redis: redis.Redis, queue: Queue, cli: Any
) -> None:
    busy, refused = "BusyOrder0000001", "RefusedOrder0001"
    sink.answer = lambda update_id, _n: (
        (503, {"Retry-After": "120"}, 0.0) if update_id.startswith(busy)
        else (400, {}, 0.0) if update_id.startswith(refused) and not sink_takes_refused
        else (200, {}, 0.0)
    )  # fmt: skip
    sink_takes_refused = False
    retrying, *waiting = await post_order(receiver, rsa_key, busy, EVENTS)
    [dead] = await post_order(receiver, rsa_key, refused)
    assert queue.deferred_job_registry.get_job_ids() == waiting  # before any worker ran
    workers(**webhook_settings(sink))

    await wait_for(lambda: retrying in queue.scheduled_job_registry, what="the retry, scheduled")
    await wait_for(lambda: dead in queue.failed_job_registry, what="the dead letter, failed")
    assert queue.deferred_job_registry.get_job_ids() == waiting
    assert queue.scheduled_job_registry.get_job_ids() == [retrying]
    assert queue.failed_job_registry.get_job_ids() == [dead]
    assert [status(sync_redis, i) for i in (retrying, *waiting, dead)] == [
        JobStatus.SCHEDULED, JobStatus.DEFERRED, JobStatus.DEFERRED, JobStatus.FAILED,
    ]  # fmt: skip
    result = Job.fetch(dead, connection=sync_redis, serializer=JSONSerializer).latest_result()
    assert result is not None and "DeadLettered: merchant answered HTTP 400" in (result.exc_string or "")
    assert queue.count == queue.started_job_registry.count == queue.finished_job_registry.count == 0

    # `intergiro-receiver dlq` stays the way back, in order: out of RQ's failed jobs, delivered
    sink_takes_refused = True
    assert cli("dlq", "requeue", dead)[0] == 0
    assert dead not in queue.failed_job_registry
    await wait_for(lambda: len(sink.attempts(dead)) == 2, what="the requeued update")
    await wait_for(lambda: not sync_redis.exists(KEYS.rq_job(dead)), what="its job done")
    assert queue.failed_job_registry.count == 0


async def test_a_queued_head_deleted_with_job_delete_is_dead_lettered_and_its_order_moves_on(
    receiver: Any, rsa_key: Any, sink: Sink, workers: Any, sync_redis: redis.Redis, worker_log: Path, cli: Any
) -> None:
    head, *later = await post_order(receiver, rsa_key, "DeletedHead00001", EVENTS)
    Job.fetch(head, connection=sync_redis, serializer=JSONSerializer).delete()  # as rq-dashboard's Delete
    workers(**webhook_settings(sink))  # its maintenance sweeps the orders' heads as it starts
    await wait_for(lambda: len(sink.received) == 2, what="the order's later updates")
    assert [r.headers["webhook-id"] for r in sink.received] == later
    assert_dead_lettered_as_deleted(cli, head, worker_log)


async def test_a_deferred_update_deleted_with_job_delete_is_dead_lettered_and_the_rest_go_in_sequence(
    receiver: Any, rsa_key: Any, sink: Sink, workers: Any, sync_redis: redis.Redis, worker_log: Path, cli: Any
) -> None:
    first, deleted, last = await post_order(receiver, rsa_key, "DeletedWaiting01", EVENTS)
    Job.fetch(deleted, connection=sync_redis, serializer=JSONSerializer).delete()
    workers(**webhook_settings(sink))
    await wait_for(lambda: len(sink.received) == 2, what="the first and last updates")
    assert [r.headers["webhook-id"] for r in sink.received] == [first, last]
    assert_dead_lettered_as_deleted(cli, deleted, worker_log)
    # and requeued from the dead-letter queue, it is delivered after all
    assert cli("dlq", "requeue", deleted)[0] == 0
    await wait_for(lambda: len(sink.received) == 3, what="the requeued update")
    assert sink.received[2].headers["webhook-id"] == deleted


def assert_dead_lettered_as_deleted(cli: Any, update_id: str, worker_log: Path) -> None:
    code, out = cli("dlq", "show", update_id)
    entry = json.loads(out)
    assert code == 0 and entry["last_error"] == DELETED_OUTSIDE and entry["update"]["id"] == update_id
    [line] = [r for r in log_lines(worker_log) if r.get("update") == update_id and r.get("reason")]
    assert line["reason"] == DELETED_OUTSIDE and line["level"] == "warning"


def log_lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(x) for x in path.read_text().splitlines() if x.startswith("{")]


def post_through_serve(redis_url: str, tmp_path: Path, **more_env: str) -> list[str]:
    """Start `intergiro-receiver serve` with the environment, POST a real Intergiro token, stop it."""
    port = free_port()
    env = serve_env(redis_url, port, LOG_FORMAT="json", **more_env)
    serve = start_command("serve", env=env, log=tmp_path / "serve.log", cwd=tmp_path)
    try:
        line = real_callbacks("order-jwt")[0]
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}/callbacks/intergiro", data=line["body"].encode(), method="POST",
            headers={"Content-Type": line["content_type"]},
        )  # fmt: skip
        deadline = time.monotonic() + 20
        while True:
            try:
                with urllib.request.urlopen(request, timeout=5) as answer:
                    return list(json.loads(answer.read())["queued"])
            except OSError:
                assert time.monotonic() < deadline and serve.poll() is None, (
                    tmp_path / "serve.log"
                ).read_text()
                time.sleep(0.1)
    finally:
        stop(serve)


async def test_rq_key_prefix_other_works_end_to_end(
    redis_url: str, sync_redis: redis.Redis, tmp_path: Path, workers: Any
) -> None:
    queued = await asyncio.to_thread(post_through_serve, redis_url, tmp_path, RQ_KEY_PREFIX="other")
    assert queued and sync_redis.llen("other:queue:order-updates") == 1
    assert list(sync_redis.scan_iter("rq:*")) == []
    workers(merchant_handler="tests.merchant_handlers:takes", rq_key_prefix="other")
    await wait_for(lambda: sync_redis.llen(DELIVERED) == len(queued), what="every update delivered")
    assert [x.decode() for x in sync_redis.lrange(DELIVERED, 0, -1)] == queued
    await wait_for(lambda: not list(sync_redis.scan_iter("other:job:*")), what="the jobs done")
    assert sync_redis.sismember("other:queues", "other:queue:order-updates")
    assert not [k for k in sync_redis.scan_iter("rq:*") if not k.startswith(b"rq:worker")]


@pytest.mark.parametrize("command", ["serve", "worker"])
def test_an_rq_key_prefix_only_in_dot_env_stops_serve_and_worker_with_one_line(
    redis_url: str, tmp_path: Path, command: str
) -> None:
    (tmp_path / ".env").write_text("RQ_KEY_PREFIX=other\n")
    env = {k: v for k, v in worker_env(redis_url, merchant_handler="tests.merchant_handlers:takes").items()
           if k != "RQ_KEY_PREFIX"}  # fmt: skip
    env["PYTHONPATH"] = str(ROOT)
    result = run_command(command, env=env, cwd=tmp_path)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 1 and len(lines) == 1, result.stderr
    assert "RQ_KEY_PREFIX" in lines[0] and command in lines[0]


async def test_a_dead_letter_requeued_from_rqs_failed_jobs_is_not_posted_and_stays_failed_and_dead_lettered(
    receiver: Any,
    rsa_key: Any,
    sink: Sink,
    workers: Any,
    sync_redis: redis.Redis,
    queue: Queue,
    worker_log: Path,
) -> None:
    sink.answer = lambda _id, _n: (400, {}, 0.0)
    [dead] = await post_order(receiver, rsa_key, "RefusedOrder0002")
    workers(**webhook_settings(sink))
    await wait_for(lambda: dead in queue.failed_job_registry, what="the dead letter, failed")
    queue.failed_job_registry.requeue(dead)  # as rq-dashboard's Requeue does
    await wait_for(lambda: log_events(worker_log, "update is dead-lettered, not delivered"), what="the rerun")
    await wait_for(lambda: dead in queue.failed_job_registry, what="failed again")
    assert len(sink.attempts(dead)) == 1 and sync_redis.hexists(KEYS.dead_letters, dead)

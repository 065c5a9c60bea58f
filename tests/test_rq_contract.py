"""The jobs the product writes from Lua are RQ's own jobs: for the same update, the hash the intake
script writes is the one `Queue.enqueue` (installed RQ, JSON serializer) writes, field by field but for
the per-job values; and a stock RQ SimpleWorker runs such a job."""

from __future__ import annotations

import asyncio
import re
import subprocess
import sys
import time
import zlib
from pathlib import Path
from typing import Any

import orjson
import pytest
import redis
from redis.asyncio import Redis as AsyncRedis
from rq import Queue, SimpleWorker
from rq.job import Job, JobStatus
from rq.serializers import JSONSerializer

import workers.delivery
from receiver import rqstore
from receiver.intake import Intake
from receiver.order import build_updates, parse_order
from receiver.rediskeys import RedisKeys
from tests.helpers import card_order
from tests.merchant_handlers import DELIVERED, ENTERED, RELEASE
from tests.processes import ROOT, worker_env

PER_JOB = {"created_at", "enqueued_at"}  # times; the ids are in the keys and the description


def fields(client: redis.Redis, job_id: str) -> dict[str, bytes]:
    raw = client.hgetall(rqstore.job_key(job_id))
    found = {k.decode(): v for k, v in raw.items()}
    try:  # RQ compresses what it writes and reads either (Job.restore)
        found["data"] = zlib.decompress(found["data"])
    except zlib.error:
        pass
    return found


def as_rq_reads(data: bytes) -> Any:
    """A job's data as RQ's JSON serializer reads it (RQ's own dumps puts spaces after separators)."""
    return JSONSerializer.loads(data)


async def stored_update(redis_url: str, settings: Any) -> dict[str, Any]:
    update = build_updates(parse_order(card_order("ContractOrder001")), received_at="2026-01-01T09:00:00.000Z",
                           verified_by="local:test")[0]  # fmt: skip
    client = AsyncRedis.from_url(redis_url)
    intake = Intake(client, RedisKeys.of(settings), 3600)
    assert await intake.store([update]) == [update["id"]]
    await client.aclose()
    return update


async def test_the_intake_script_writes_the_job_queue_enqueue_writes(
    redis_url: str, sync_redis: redis.Redis, settings: Any
) -> None:
    update = await stored_update(redis_url, settings)
    queue = Queue(settings.queue_name, connection=sync_redis, serializer=JSONSerializer)
    other_id = "enqueued-by-rq"
    queue.enqueue(rqstore.DELIVER_UPDATE, update, **rqstore.enqueue_options(other_id))

    ours, rqs = fields(sync_redis, update["id"]), fields(sync_redis, other_id)
    assert set(ours) == set(rqs)
    rqs["description"] = rqs["description"].replace(other_id.encode(), update["id"].encode())
    assert (
        as_rq_reads(ours.pop("data"))
        == as_rq_reads(rqs.pop("data"))
        == [rqstore.DELIVER_UPDATE, None, [update], {}]
    )
    for name in sorted(set(ours) - PER_JOB):
        assert (name, ours[name]) == (name, rqs[name])
    for name in PER_JOB:  # RQ's timestamp format
        assert len(ours[name]) == len(rqs[name]) and ours[name].endswith(b"Z")
    assert sync_redis.hget(rqstore.job_key(update["id"]), "data") == rqstore.job_data(update)
    assert rqstore.job_data(update) == orjson.dumps([rqstore.DELIVER_UPDATE, None, [update], {}])
    job = Job.fetch(update["id"], connection=sync_redis, serializer=JSONSerializer)
    assert (job.func_name, list(job.args), job.get_status()) == (
        rqstore.DELIVER_UPDATE,
        [update],
        JobStatus.QUEUED,
    )
    assert sync_redis.lrange(queue.key, 0, -1) == [update["id"].encode(), other_id.encode()]


async def test_a_stock_rq_simple_worker_with_the_json_serializer_runs_the_job(
    redis_url: str, sync_redis: redis.Redis, settings: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    update = await stored_update(redis_url, settings)
    monkeypatch.setenv("REDIS_URL", redis_url)
    monkeypatch.setenv("MERCHANT_HANDLER", "tests.merchant_handlers:takes")
    monkeypatch.delenv("MERCHANT_WEBHOOK_URL", raising=False)
    monkeypatch.setattr(workers.delivery, "_context", None)  # built from the environment by the job
    queue = Queue(settings.queue_name, connection=sync_redis, serializer=JSONSerializer)
    worker = SimpleWorker([queue], connection=sync_redis, serializer=JSONSerializer)
    assert worker.work(burst=True, with_scheduler=False)
    assert sync_redis.lrange(DELIVERED, 0, -1) == [update["id"].encode()]
    assert not sync_redis.exists(rqstore.job_key(update["id"]))  # done: RQ deleted it (result_ttl 0)


async def test_a_job_the_intake_writes_with_meta_has_the_meta_queue_enqueue_writes(
    redis_url: str, sync_redis: redis.Redis, settings: Any
) -> None:
    # The callback's trace context rides on the job as RQ's `meta` (receiver/tracing.py).
    meta = {"traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"}
    update = build_updates(parse_order(card_order("ContractOrder002")), received_at="2026-01-01T09:00:00.000Z",
                           verified_by="local:test")[0]  # fmt: skip
    client = AsyncRedis.from_url(redis_url)
    intake = Intake(client, RedisKeys(settings.redis_key_prefix, settings.queue_name), 3600)
    assert await intake.store([update], job_meta=orjson.dumps(meta)) == [update["id"]]
    await client.aclose()
    queue = Queue(settings.queue_name, connection=sync_redis, serializer=JSONSerializer)
    queue.enqueue(rqstore.DELIVER_UPDATE, update, meta=meta, **rqstore.enqueue_options("enqueued-by-rq"))
    ours, rqs = fields(sync_redis, update["id"]), fields(sync_redis, "enqueued-by-rq")
    assert set(ours) == set(rqs)
    assert JSONSerializer.loads(ours["meta"]) == JSONSerializer.loads(rqs["meta"]) == meta
    assert Job.fetch(update["id"], connection=sync_redis, serializer=JSONSerializer).meta == meta


# The worker's records (workers/rqrecords.py). Per-run values give way to placeholders: the worker's
# name, execution ids, times and counts of seconds.
EXECUTION_ID = re.compile(rb"\b[0-9a-f]{32}\b")
TIME = re.compile(rb"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?Z?")
PER_RUN_FIELDS = {b"birth", b"last_heartbeat", b"pid", b"hostname", b"ip_address", b"total_working_time",
                  b"version", b"python_version", b"started_at", b"ended_at", b"created_at",
                  b"current_job_working_time", b"enqueued_at"}  # fmt: skip


def rq_records(client: redis.Redis) -> dict[str, Any]:
    """RQ's keys (`rq:`) and what each holds (a hash's fields; a set's, sorted set's or list's members;
    whether it expires), each run's own values replaced by placeholders."""
    worker_names = [raw.decode().removeprefix("rq:worker:").encode() for raw in client.smembers("rq:workers")]

    def plain(raw: bytes) -> str:
        for name in worker_names:
            raw = raw.replace(name, b"<worker>")
        return TIME.sub(b"<time>", EXECUTION_ID.sub(b"<execution>", raw)).decode()

    records: dict[str, Any] = {}
    for key in sorted(client.scan_iter(match="rq:*")):
        kind = client.type(key).decode()
        if kind == "hash":
            held: Any = {plain(f): "<per run>" if f in PER_RUN_FIELDS else plain(v)
                         for f, v in client.hgetall(key).items()}  # fmt: skip
            held.pop("data", None)  # the job's own (compressed by RQ, not by the intake: see above)
        elif kind == "zset":
            held = sorted(plain(m) for m in client.zrange(key, 0, -1))
        elif kind == "set":
            held = sorted(plain(m) for m in client.smembers(key))
        elif kind == "list":
            held = [plain(m) for m in client.lrange(key, 0, -1)]
        else:
            held = plain(client.get(key) or b"")
        records[plain(key)] = (kind, held, client.ttl(key) > 0)
    return records


def run_holding_worker(
    command: list[str], env: dict[str, str], client: redis.Redis, log: Path
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Run a burst worker `command` on one queued update whose handler holds it (merchant_handlers.holds):
    RQ's records while the delivery is in flight, and once the worker is gone."""
    with log.open("ab") as out:
        process = subprocess.Popen(command, env=env, cwd=ROOT, stdout=out, stderr=out)
    try:
        deadline = time.monotonic() + 30
        while not client.llen(ENTERED):
            assert process.poll() is None and time.monotonic() < deadline, log.read_text()[-2000:]
            time.sleep(0.02)
        in_flight = rq_records(client)
        client.set(RELEASE, 1)
        assert process.wait(timeout=30) == 0, log.read_text()[-2000:]
    finally:
        if process.poll() is None:
            process.kill()
    assert client.lrange(DELIVERED, 0, -1) == client.lrange(ENTERED, 0, -1)
    return in_flight, rq_records(client)


async def test_the_worker_with_deliveries_in_flight_writes_what_rqs_own_simple_worker_writes(
    redis_url: str, sync_redis: redis.Redis, settings: Any, tmp_path: Path
) -> None:
    # workers/rqrecords.py takes, starts and ends jobs a batch at a time; what RQ holds while a delivery
    # is in flight and once it succeeded is what RQ's SimpleWorker (`rq worker`) leaves for the same job.
    env = worker_env(redis_url, merchant_handler="tests.merchant_handlers:holds", delivery_concurrency=4)
    stock = [str(Path(sys.executable).parent / "rq"), "worker", "--burst", "--url", redis_url,
             "--worker-class", "rq.worker.SimpleWorker", "--serializer", "rq.serializers.JSONSerializer",
             settings.queue_name]  # fmt: skip
    ours = [sys.executable, "-m", "receiver", "worker", "--burst", "--processes", "1"]
    seen = []
    for command in (stock, ours):
        sync_redis.flushdb()  # the suite's own database: each worker starts from the same state
        await stored_update(redis_url, settings)
        seen.append(run_holding_worker(command, env, sync_redis, tmp_path / "worker.log"))
    (rq_in_flight, rq_after), (our_in_flight, our_after) = seen
    assert any(key.startswith("rq:wip:") for key in our_in_flight)  # the job is in StartedJobRegistry
    assert our_in_flight == rq_in_flight
    assert our_after == rq_after


async def test_a_queued_id_whose_job_is_gone_is_passed_over_as_rqs_dequeue_passes_over_it(
    redis_url: str, sync_redis: redis.Redis, settings: Any, tmp_path: Path
) -> None:
    # An id on the queue with no job hash (deleted by hand, say): RQ's dequeue skips it; the batched take
    # (workers/rqrecords.py JobTaker) too, and leaves nothing of it in RQ's intermediate queue.
    queue = Queue(settings.queue_name, connection=sync_redis, serializer=JSONSerializer)
    sync_redis.rpush(queue.key, "no-such-job")
    update = await stored_update(redis_url, settings)
    env = worker_env(redis_url, merchant_handler="tests.merchant_handlers:takes", delivery_concurrency=4)
    done = await asyncio.to_thread(subprocess.run, [sys.executable, "-m", "receiver", "worker", "--burst", "--processes", "1"],
                          env=env, cwd=ROOT, capture_output=True, timeout=60, check=False)  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    assert sync_redis.lrange(DELIVERED, 0, -1) == [update["id"].encode()]
    assert sync_redis.llen(queue.key) == 0
    assert sync_redis.llen(f"{queue.key}:intermediate") == 0

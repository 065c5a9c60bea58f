"""Delivery to the merchant: real worker processes, a real Redis, a real aiohttp sink."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from rq import Queue, Worker
from rq.serializers import JSONSerializer
from standardwebhooks.webhooks import Webhook

from receiver.app import CALLBACK_PATH
from receiver.chains import OrderChains
from receiver.rediskeys import RedisKeys
from receiver.retries import RetrySchedule, backoff_delay
from receiver.retry_after import parse_retry_after
from receiver.rqstore import DELIVER_UPDATE
from tests.conftest import queued_updates
from tests.helpers import JWT, card_order, token
from tests.merchant_handlers import CALLS, DELIVERED
from tests.processes import ROOT, is_running, run_command, start_command, stop, worker_env
from tests.sink import SECRET, Sink, log_events, wait_for
from workers.runner import MAX_RESTART_PAUSE_SECONDS, STEADY_LOOP_SECONDS, restart_pause

EVENTS = ("order", "charge", "refund")


def webhook_settings(sink: Sink, **more: Any) -> dict[str, Any]:
    return {"merchant_webhook_url": sink.url, "merchant_webhook_secret": SECRET, **more}


async def post_order(
    receiver: Any, key: Any, order_id: str, events: tuple[str, ...] = ("order",)
) -> list[str]:
    response = await receiver.post(CALLBACK_PATH, data=token(card_order(order_id, events), key), headers=JWT)
    assert response.status == 200, await response.text()
    return list((await response.json())["queued"])


async def post_dead_lettered(receiver: Any, key: Any, sync_redis: Any, order_id: str) -> str:
    """Posts a one-event order that the running worker dead-letters (its merchant refuses it); its
    update's id, once it is in the dead-letter queue."""
    [update_id] = await post_order(receiver, key, order_id)
    await wait_for(lambda: sync_redis.hexists(RedisKeys().dead_letters, update_id), what="the dead letter")
    return update_id


async def test_every_delivery_is_signed_with_the_secret_and_carries_the_queued_update(
    receiver: Any, rsa_key: Any, sink: Sink, workers: Any, sync_redis: Any, settings: Any
) -> None:
    ids = await post_order(receiver, rsa_key, "SignedOrder00001", EVENTS[:2])
    queued = {u["id"]: u for u in queued_updates(sync_redis, settings)}
    workers(**webhook_settings(sink))
    await wait_for(lambda: len(sink.received) == 2, what="two deliveries")
    verifier = Webhook(SECRET)
    for received in sink.received:
        assert verifier.verify(received.body, received.headers) == queued[received.headers["webhook-id"]]
        assert received.headers["Idempotency-Key"] == received.headers["webhook-id"]
    assert [r.headers["webhook-id"] for r in sink.received] == ids
    metrics = await (await receiver.get("/metrics")).text()
    assert 'intergiro_deliveries_total{outcome="delivered"} 2.0' in metrics
    assert "intergiro_workers_alive 1.0" in metrics


async def test_a_sink_answering_500_twice_is_delivered_on_the_third_attempt_after_the_backoff(
    receiver: Any, rsa_key: Any, sink: Sink, workers: Any, tmp_path: Path, sync_redis: Any
) -> None:
    sink.answer = lambda _id, n: (500 if n <= 2 else 200, {}, 0.0)
    [update_id] = await post_order(receiver, rsa_key, "FlakyOrder000001")
    base = 0.05
    workers(**webhook_settings(sink, delivery_backoff_seconds=base))
    await wait_for(lambda: len(sink.received) == 3, what="three attempts")
    await wait_for(lambda: len(log_events(tmp_path / "worker.log", "delivery retry scheduled")) == 2)
    attempts = sink.attempts(update_id)
    assert [a.headers["webhook-id"] for a in attempts] == [update_id] * 3
    retries = log_events(tmp_path / "worker.log", "delivery retry scheduled")
    for number, (retry, before, after) in enumerate(zip(retries, attempts, attempts[1:], strict=False), 1):
        assert retry["attempt"] == number
        assert 0 <= retry["retry_in"] <= base * 2 ** (number - 1)  # full jitter under the exponential cap
        assert after.at - before.at >= retry["retry_in"] - 0.001  # never sooner than scheduled
    assert len(sink.received) == 3
    await wait_for(lambda: not sync_redis.exists(RedisKeys().order_head("FlakyOrder000001")))
    metrics = await (await receiver.get("/metrics")).text()
    for line in (
        'intergiro_delivery_attempts_total{result="retryable"} 2.0',
        'intergiro_delivery_attempts_total{result="success"} 1.0',
        'intergiro_deliveries_total{outcome="retry_scheduled"} 2.0',
        'intergiro_deliveries_total{outcome="delivered"} 1.0',
        "intergiro_delivery_seconds_count 3.0",
    ):
        assert line in metrics


async def test_retry_after_on_a_429_is_honoured(
    receiver: Any, rsa_key: Any, sink: Sink, workers: Any
) -> None:
    sink.answer = lambda _id, n: (429, {"Retry-After": "1"}, 0.0) if n == 1 else (200, {}, 0.0)
    await post_order(receiver, rsa_key, "BusyOrder0000001")
    workers(**webhook_settings(sink, delivery_backoff_seconds=0.01))
    await wait_for(lambda: len(sink.received) == 2, what="the retry")
    assert sink.received[1].at - sink.received[0].at >= 1.0


async def test_updates_of_an_order_arrive_in_sequence_with_four_workers_and_nothing_twice(
    receiver: Any, rsa_key: Any, sink: Sink, workers: Any
) -> None:
    orders = [f"Interleaved{n:05d}" for n in range(200)]
    for round_ in range(1, 4):  # every order's callback grows by one event per round, as Intergiro sends
        for order_id in orders:
            assert len(await post_order(receiver, rsa_key, order_id, EVENTS[:round_])) == 1
    # a generous timeout: 4 x DELIVERY_CONCURRENCY requests at once to this test's own loop may be answered
    # after a second, and a timed-out POST is rightly sent again (at least once)
    workers("--processes", "4", **webhook_settings(sink, delivery_timeout_seconds=10))
    await wait_for(lambda: len(sink.received) >= 600, seconds=120, what="600 deliveries")
    ids = [r.headers["webhook-id"] for r in sink.received]
    assert len(ids) == len(set(ids)) == 600
    by_order: dict[str, list[int]] = {}
    for received in sink.received:
        update = received.update
        by_order.setdefault(update["order_id"], []).append(update["event"]["sequence"])
    assert by_order == {order_id: [0, 1, 2] for order_id in orders}


async def test_a_worker_killed_mid_delivery_loses_nothing(
    receiver: Any, rsa_key: Any, sink: Sink, workers: Any, sync_redis: Any
) -> None:
    sink.answer = lambda _id, n: (200, {}, 5.0 if n == 1 else 0.0)
    [update_id] = await post_order(receiver, rsa_key, "KilledOrder00001")
    settings = webhook_settings(sink, delivery_timeout_seconds=1)
    first = workers(**settings)
    await wait_for(lambda: len(sink.received) == 1, what="the slow first attempt")
    os.kill(first.pid, signal.SIGKILL)
    first.wait(5)
    workers(**settings)
    await wait_for(lambda: len(sink.attempts(update_id)) >= 2, seconds=60, what="redelivery")
    await wait_for(lambda: not sync_redis.exists(RedisKeys().order_head("KilledOrder00001")))
    assert len(sink.attempts(update_id)) == 2


async def test_an_attempt_whose_worker_is_killed_mid_post_counts_toward_the_last_attempt(
    receiver: Any, rsa_key: Any, sink: Sink, workers: Any, sync_redis: Any
) -> None:
    sink.answer = lambda _id, _n: (200, {}, 5.0)  # no attempt answers before its worker is killed
    [update_id] = await post_order(receiver, rsa_key, "KilledOrder00002")
    settings = webhook_settings(sink, delivery_timeout_seconds=1, delivery_max_attempts=1)
    first = workers(**settings)
    await wait_for(lambda: len(sink.received) == 1, what="the only attempt allowed")
    os.kill(first.pid, signal.SIGKILL)
    first.wait(5)
    workers(**settings)
    await wait_for(lambda: sync_redis.hexists(RedisKeys().dead_letters, update_id), seconds=60,
                   what="the update dead-lettered after its one attempt")  # fmt: skip
    entry = json.loads(sync_redis.hget(RedisKeys().dead_letters, update_id))
    assert (entry["attempts"], entry["last_error"]) == (1, "worker stopped during the attempt")
    assert len(sink.attempts(update_id)) == 1  # never POSTed a second time
    assert not sync_redis.exists(RedisKeys().order_head("KilledOrder00002"))


async def test_an_update_run_again_after_its_delivery_finished_is_not_posted_twice(
    receiver: Any, rsa_key: Any, sink: Sink, workers: Any, sync_redis: Any, settings: Any, tmp_path: Path
) -> None:
    # A worker that dies after finishing a delivery but before RQ records the job's end gets the job
    # re-queued by RQ's recovery: the update is no longer its order's head and must not be POSTed again.
    [update_id] = await post_order(receiver, rsa_key, "FinishedOrder001")
    [update] = queued_updates(sync_redis, settings)
    workers(**webhook_settings(sink))
    await wait_for(lambda: not sync_redis.exists(RedisKeys().order_head("FinishedOrder001")))
    # and RQ has recorded the first run's end (result_ttl 0: it deletes the job), which would otherwise
    # delete the job queued again below, on a busy machine
    await wait_for(
        lambda: not sync_redis.exists(RedisKeys().rq_job(update_id)), what="RQ's end of the first run"
    )
    Queue(settings.queue_name, connection=sync_redis, serializer=JSONSerializer).enqueue_call(
        DELIVER_UPDATE, args=(update,), job_id=update_id, result_ttl=0
    )
    await wait_for(
        lambda: len(log_events(tmp_path / "worker.log", "update already finished, not delivered again")) == 1
    )
    assert len(sink.attempts(update_id)) == 1
    metrics = await (await receiver.get("/metrics")).text()
    assert 'intergiro_deliveries_total{outcome="duplicate_skipped"} 1.0' in metrics
    assert not sync_redis.exists(RedisKeys().delivery(update_id))


async def test_an_update_whose_job_rq_fails_to_clean_up_is_posted_once_and_its_order_moves_on(
    receiver: Any, rsa_key: Any, sink: Sink, workers: Any, sync_redis: Any
) -> None:
    # RQ 3.0 fails to record a job's success when the job's execution registry names an execution
    # whose hash is gone (seen in the chaos run): it raises before its transaction, runs the job again.
    ids = await post_order(receiver, rsa_key, "StaleExecution01", EVENTS[:2])
    sync_redis.zadd(f"rq:executions:{ids[0]}", {"gone-execution": time.time() + 3600})
    workers(**webhook_settings(sink))
    await wait_for(lambda: len(sink.received) == 2, what="both updates")
    await wait_for(lambda: not sync_redis.exists(RedisKeys().order_head("StaleExecution01")))
    await asyncio.sleep(1.0)  # RQ's second run of the first job, if it POSTed, would be here by now
    assert [r.headers["webhook-id"] for r in sink.received] == ids
    metrics = await (await receiver.get("/metrics")).text()
    assert 'intergiro_deliveries_total{outcome="delivered"} 2.0' in metrics


async def test_deliveries_go_on_in_sequence_after_redis_forgets_its_scripts(
    receiver: Any, rsa_key: Any, sink: Sink, workers: Any, sync_redis: Any
) -> None:
    workers(**webhook_settings(sink))
    first = await post_order(receiver, rsa_key, "ForgetfulOrder01")
    await wait_for(lambda: len(sink.received) == 1, what="the first delivery")
    sync_redis.script_flush()  # as after a Redis restart or failover
    later = await post_order(receiver, rsa_key, "ForgetfulOrder02", EVENTS)
    await wait_for(lambda: len(sink.received) == 4, what="the second order's three updates")
    await wait_for(lambda: not sync_redis.exists(RedisKeys().order_head("ForgetfulOrder02")))
    assert [r.headers["webhook-id"] for r in sink.received] == first + later


async def test_a_plain_rq_worker_delivers_the_updates_in_sequence_too(
    receiver: Any, rsa_key: Any, sink: Sink, redis_url: str, settings: Any
) -> None:
    ids = await post_order(receiver, rsa_key, "PlainRqOrder0001", EVENTS)
    command = [
        str(Path(sys.executable).parent / "rq"), "worker", "--burst", "--url", redis_url,
        "--serializer", "json", "--worker-class", "rq.worker.SimpleWorker", settings.queue_name,
    ]  # fmt: skip
    env = worker_env(redis_url, **webhook_settings(sink))
    # one burst run: finishing each update queues the order's next before the worker looks again
    done = await asyncio.to_thread(
        subprocess.run, command, env=env, cwd=ROOT, capture_output=True, timeout=60
    )
    assert done.returncode == 0, done.stderr.decode()[-2000:]
    assert [r.headers["webhook-id"] for r in sink.received] == ids


async def test_a_handler_raising_twice_is_called_three_times_and_done(
    receiver: Any, rsa_key: Any, workers: Any, sync_redis: Any
) -> None:
    [update_id] = await post_order(receiver, rsa_key, "HandledOrder0001")
    workers(merchant_handler="tests.merchant_handlers:flaky", delivery_backoff_seconds=0.01)
    await wait_for(lambda: sync_redis.llen(DELIVERED) == 1, what="the handler to take the update")
    assert int(sync_redis.get(CALLS)) == 3
    assert sync_redis.lrange(DELIVERED, 0, -1) == [update_id.encode()]
    assert sync_redis.hlen(RedisKeys().dead_letters) == 0


async def test_a_handler_raising_permanent_delivery_error_dead_letters_at_once(
    receiver: Any, rsa_key: Any, workers: Any, sync_redis: Any
) -> None:
    [update_id] = await post_order(receiver, rsa_key, "RefusedOrder0001")
    workers(merchant_handler="tests.merchant_handlers:refuses")
    await wait_for(lambda: sync_redis.hexists(RedisKeys().dead_letters, update_id), what="the dead letter")
    assert int(sync_redis.get(CALLS)) == 1


async def test_worker_without_processes_runs_two_rq_workers_per_destination_and_delivers(
    receiver: Any, rsa_key: Any, sink: Sink, redis_url: str, queue: Queue, tmp_path: Path
) -> None:
    ids = await post_order(receiver, rsa_key, "TwoProcesses0001", EVENTS)
    env = worker_env(redis_url, **webhook_settings(sink))
    process = start_command("worker", env=env, log=tmp_path / "worker.log")  # as the README starts it
    try:
        await wait_for(lambda: len(sink.received) == len(ids), what="every update delivered")
        assert [r.headers["webhook-id"] for r in sink.received] == ids  # in sequence
        rq_workers = Worker.all(connection=queue.connection, queue=queue, serializer=JSONSerializer)
        assert len(rq_workers) == 2
        assert len({w.pid for w in rq_workers} - {process.pid}) == 2  # two processes of their own
    finally:
        stop(process)


async def test_worker_processes_stop_once_their_worker_command_is_sigkilled(
    redis_url: str, queue: Queue, tmp_path: Path
) -> None:
    env = worker_env(redis_url, merchant_handler="tests.merchant_handlers:takes")
    process = start_command("worker", "--processes", "2", env=env, log=tmp_path / "worker.log")
    try:
        registered = lambda: Worker.all(connection=queue.connection, queue=queue, serializer=JSONSerializer)  # noqa: E731
        await wait_for(lambda: len(registered()) == 2, what="two RQ workers")
        pids = [w.pid for w in registered()]
        os.kill(process.pid, signal.SIGKILL)  # it cannot pass a stop on to its processes
        process.wait(5)
        await wait_for(lambda: not registered(), seconds=20, what="both to stop and register their end")
        await wait_for(lambda: not any(is_running(pid) for pid in pids), what="both processes gone")
    finally:
        stop(process)


def test_a_worker_with_neither_url_nor_handler_refuses_to_start_with_one_line(redis_url: str) -> None:
    result = run_command("worker", env=worker_env(redis_url))
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "MERCHANT_WEBHOOK_URL" in lines[0] and "MERCHANT_HANDLER" in lines[0]


async def test_a_head_whose_job_was_deleted_releases_its_order(
    receiver: Any, rsa_key: Any, sync_redis: Any, settings: Any
) -> None:
    first, second = await post_order(receiver, rsa_key, "StaleOrder000001", EVENTS[:2])
    keys = RedisKeys()
    sync_redis.delete(keys.rq_job(first))  # e.g. purged by hand from rq-dashboard
    sync_redis.delete(keys.rq_queue)
    assert OrderChains(sync_redis, keys).release_stale_heads() == 1
    assert sync_redis.get(keys.order_head("StaleOrder000001")) == second.encode()
    assert sync_redis.lrange(keys.rq_queue, 0, -1) == [second.encode()]
    assert sync_redis.hget(keys.rq_job(second), "status") == b"queued"


def test_backoff_is_full_jitter_under_a_doubling_cap_of_one_hour() -> None:
    assert backoff_delay(1, 2.0, rng=lambda: 1.0) == 2.0
    assert backoff_delay(4, 2.0, rng=lambda: 1.0) == 16.0
    assert backoff_delay(4, 2.0, rng=lambda: 0.25) == 4.0
    assert backoff_delay(40, 2.0, rng=lambda: 1.0) == 3600.0
    assert backoff_delay(1, 2.0, retry_after=30, rng=lambda: 0.5) == 30.0


def test_retry_after_is_read_as_seconds_or_an_http_date() -> None:
    now = datetime(2026, 1, 1, 12, 0, 0, tzinfo=UTC)
    assert parse_retry_after("7") == 7.0
    assert parse_retry_after((now + timedelta(seconds=90)).strftime("%a, %d %b %Y %H:%M:%S GMT"), now) == 90.0
    assert parse_retry_after("soon") is None
    assert parse_retry_after(None) is None


def test_the_maintenance_thread_outlives_a_step_that_fails_and_goes_on_with_its_steps(
    make_settings: Any, sink: Sink
) -> None:
    """A maintenance step that raises something other than a Redis error (a bug, a surprise from RQ) is
    logged and tried again: the thread lives on, and with it the queueing of due retries."""
    from workers.delivery import DeliveryContext
    from workers.maintenance import Maintenance

    settings = make_settings(**webhook_settings(sink))
    context = DeliveryContext.create(settings)
    real_move_due = context.retries.move_due
    calls: list[str] = []

    def failing_once(limit: int = 500) -> tuple[int, float | None]:
        calls.append("move_due")
        if len(calls) == 1:
            raise ValueError("a step that fails in a way nobody foresaw")
        return real_move_due(limit)

    context.retries.move_due = failing_once  # type: ignore[method-assign]
    thread = Maintenance(context, settings.queue_name, recovery_seconds=60)
    thread.start()
    try:
        deadline = time.monotonic() + 10
        while len(calls) < 3 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert thread.is_alive()
        assert len(calls) >= 3  # it went on after the failure
    finally:
        thread.stopping.set()
        thread.join(5)


async def test_a_dead_letter_is_one_warning_line_with_its_attempt_and_no_rq_traceback(
    receiver: Any, rsa_key: Any, sink: Sink, workers: Any, sync_redis: Any, tmp_path: Path
) -> None:
    sink.answer = lambda _id, _n: (400, {}, 0.0)
    worker = workers(**webhook_settings(sink))
    update_id = await post_dead_lettered(receiver, rsa_key, sync_redis, "LoggedRefusal001")
    stop(worker)
    [line] = log_events(tmp_path / "worker.log", "update dead-lettered")
    assert line | {"duration_ms": None, "timestamp": None, "pid": None, "next_update_of_order": None} == {
        "event": "update dead-lettered", "level": "warning", "update": update_id, "order": "LoggedRefusal001",
        "destination": "merchant", "attempt": 1, "target": "webhook", "http_status": 400,
        "error": "merchant answered HTTP 400", "duration_ms": None, "timestamp": None, "pid": None,
        "next_update_of_order": None,
    }  # fmt: skip
    assert line["duration_ms"] >= 0
    text = (tmp_path / "worker.log").read_text()
    assert "Traceback" not in text and '"level":"error"' not in text


async def test_a_burst_worker_exits_once_its_queue_is_empty_not_a_minute_later(
    receiver: Any, rsa_key: Any, workers: Any, sync_redis: Any, tmp_path: Path
) -> None:
    # RQ's command-channel thread, told to stop only after it was unsubscribed, could wait a minute for
    # a new subscription before it ended, and the process with it (DeliveryWorker.unsubscribe).
    for run in range(4):
        for n in range(5):
            await post_order(receiver, rsa_key, f"ExitOrder{run}{n:06d}")
        process = workers("--burst", "--processes", "2", merchant_handler="tests.merchant_handlers:takes")
        assert process.wait(timeout=20) == 0, (tmp_path / "worker.log").read_text()[-2000:]
    assert sync_redis.llen(DELIVERED) == 20


async def test_rq_suspend_holds_the_deliveries_until_rq_resume(
    receiver: Any, rsa_key: Any, workers: Any, sync_redis: Any, redis_url: str
) -> None:
    # RQ's own tool: `rq suspend` holds every worker before its next job (DeliveryWorker looks at most
    # once a second, not before every job of a batch), `rq resume` lets them go on.
    rq = str(Path(sys.executable).parent / "rq")
    workers(merchant_handler="tests.merchant_handlers:takes")
    await post_order(receiver, rsa_key, "SuspendOrder0001")
    await wait_for(lambda: sync_redis.llen(DELIVERED) == 1, what="the first delivery")
    await asyncio.to_thread(
        subprocess.run, [rq, "suspend", "--url", redis_url], check=True, capture_output=True
    )
    await asyncio.sleep(2)  # the worker's next look for a suspension
    await post_order(receiver, rsa_key, "SuspendOrder0002")
    await asyncio.sleep(3)
    assert sync_redis.llen(DELIVERED) == 1, "delivered while RQ's workers were suspended"
    await asyncio.to_thread(
        subprocess.run, [rq, "resume", "--url", redis_url], check=True, capture_output=True
    )
    await wait_for(lambda: sync_redis.llen(DELIVERED) == 2, what="the delivery after rq resume")


async def test_a_scheduled_retry_the_retry_schedule_lost_is_made_due_and_queued(
    receiver: Any, rsa_key: Any, sync_redis: Any, settings: Any
) -> None:
    # The state the chaos run left once: the head's job `scheduled` in RQ's eyes, in neither the retry
    # schedule nor the queue, so nothing would queue it again. The workers' sweep makes it due.
    [update_id] = await post_order(receiver, rsa_key, "LostRetry0000001")
    keys = RedisKeys()
    sync_redis.delete(keys.rq_queue)
    sync_redis.hset(keys.rq_job(update_id), "status", "scheduled")
    assert OrderChains(sync_redis, keys).release_stale_heads() == 0  # no order moved on
    assert sync_redis.zscore(keys.retry_schedule, update_id) is not None
    assert RetrySchedule(sync_redis, keys).move_due()[0] == 1
    assert sync_redis.lrange(keys.rq_queue, 0, -1) == [update_id.encode()]
    assert sync_redis.hget(keys.rq_job(update_id), "status") == b"queued"
    # a scheduled retry still in the schedule, or one on the queue, is left as it is
    sync_redis.hset(keys.rq_job(update_id), "status", "scheduled")
    OrderChains(sync_redis, keys).release_stale_heads()
    assert sync_redis.zscore(keys.retry_schedule, update_id) is None
    assert sync_redis.lrange(keys.rq_queue, 0, -1) == [update_id.encode()]


def test_the_loops_restart_pause_doubles_while_redis_stays_away_and_starts_over_for_a_new_outage() -> None:
    pauses = [restart_pause(None, 0.5)]
    for _ in range(5):  # the loop keeps failing at once: Redis is still away
        pauses.append(restart_pause(pauses[-1], 0.5))
    assert pauses == [1.0, 2.0, 4.0, 8.0, MAX_RESTART_PAUSE_SECONDS, MAX_RESTART_PAUSE_SECONDS]
    # a loop that delivered for a while before the next Redis error: a new outage, a second's pause,
    # not the longest pause an outage of last week left behind
    assert restart_pause(MAX_RESTART_PAUSE_SECONDS, STEADY_LOOP_SECONDS + 1) == 1.0

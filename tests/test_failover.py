"""Redis high availability: the master is SIGKILLed while Intergiro-like senders post callbacks.

A master, two replicas and three sentinels; a receiver and a worker that know only the sentinels
(`REDIS_SENTINELS`, `REDIS_SENTINEL_MASTER`) and a receiver with `REDIS_MIN_REPLICAS=1`. Two replicas,
so that the promoted one still has a replica to confirm writes (with one, the receiver answers 503
until the old master is back as a replica, see the README). The figures are printed.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from receiver.app import create_app
from tests.helpers import JWT, card_order, token
from tests.processes import SentinelCluster, free_port, start_worker, stop, worker_env
from tests.sink import SECRET, Sink, wait_for

ORDERS = 300
SENDERS = 10
KILL_AFTER_ACCEPTED = 100


@pytest.fixture
def cluster() -> Iterator[SentinelCluster]:
    cluster = SentinelCluster(replicas=2)
    cluster.start()
    yield cluster
    cluster.cleanup()


def sentinel_env(cluster: SentinelCluster) -> dict[str, str]:
    return {
        "REDIS_SENTINELS": ",".join(f"{host}:{port}" for host, port in cluster.addresses),
        "REDIS_SENTINEL_MASTER": cluster.name,
    }


@dataclass
class Answers:
    """Every answer the senders got: (monotonic time, HTTP status or 0 for no answer, order id)."""

    seen: list[tuple[float, int, str]] = field(default_factory=list)
    accepted: dict[str, float] = field(default_factory=dict)
    slowest_refusal: float = 0.0

    def after(self, moment: float) -> list[tuple[float, int, str]]:
        return [a for a in self.seen if a[0] >= moment]


async def send_like_intergiro(
    session: aiohttp.ClientSession, url: str, order_id: str, body: bytes, answers: Answers
) -> None:
    """POST until 200, backing off after any other answer or none (Intergiro's rule, shorter delays)."""
    delay = 0.05
    while True:
        sent = time.monotonic()
        try:
            async with session.post(url, data=body, headers=JWT) as answer:
                await answer.read()
                status = answer.status
        except aiohttp.ClientError:
            status = 0
        answers.seen.append((time.monotonic(), status, order_id))
        if status != 200:
            answers.slowest_refusal = max(answers.slowest_refusal, time.monotonic() - sent)
        if status == 200:
            answers.accepted[order_id] = time.monotonic()
            return
        await asyncio.sleep(delay)
        delay = min(delay * 2, 0.4)


async def test_a_master_killed_under_load_costs_503s_only_and_every_accepted_callback_is_delivered(
    aiohttp_server: Any,
    make_settings: Callable[..., Any],
    cluster: SentinelCluster,
    rsa_key: Any,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    request: pytest.FixtureRequest,
) -> None:
    sink = Sink()
    sink_server = await aiohttp_server(sink.app())
    settings = make_settings(
        redis_url="redis://127.0.0.1/0",  # with sentinels only the db number (and password) is read
        redis_sentinels=cluster.addresses,
        redis_sentinel_master=cluster.name,
        redis_min_replicas=1,
    )
    receiver = await aiohttp_server(create_app(settings))
    url = str(receiver.make_url("/callbacks/intergiro"))
    worker_log = tmp_path / "worker.log"
    worker = start_worker(
        worker_env(
            "redis://127.0.0.1/0",
            merchant_webhook_url=str(sink_server.make_url("/hooks")),
            merchant_webhook_secret=SECRET,
            delivery_backoff_seconds=0.1,
            **sentinel_env(cluster),
        ),
        worker_log,
    )
    request.addfinalizer(lambda: stop(worker))
    orders = [f"Failover{n:08d}" for n in range(ORDERS)]
    bodies = {order_id: token(card_order(order_id), rsa_key) for order_id in orders}
    answers = Answers()
    old_master = cluster.master.port
    killed_at = 0.0
    promoted_at = 0.0

    readiness: list[int] = []

    async def kill_master_midway(session: aiohttp.ClientSession) -> None:
        nonlocal killed_at, promoted_at
        await wait_for(lambda: len(answers.accepted) >= KILL_AFTER_ACCEPTED, what="load before the kill")
        cluster.master.kill()  # SIGKILL: no goodbye to replicas or clients
        killed_at = time.monotonic()
        async with session.get(receiver.make_url("/readyz")) as ready:  # sentinels need 1 s to notice
            readiness.append(ready.status)
        for _ in range(600):  # at most 30 s
            if await asyncio.to_thread(cluster.current_master_port) != old_master:
                break
            await asyncio.sleep(0.05)
        promoted_at = time.monotonic()

    todo: asyncio.Queue[str] = asyncio.Queue()
    for order_id in orders:
        todo.put_nowait(order_id)

    async def sender(session: aiohttp.ClientSession) -> None:
        while not todo.empty():
            order_id = todo.get_nowait()
            await send_like_intergiro(session, url, order_id, bodies[order_id], answers)
            await asyncio.sleep(0.1)  # about 100 callbacks/s in all: a few seconds of load

    started = time.monotonic()
    async with aiohttp.ClientSession() as session:
        killer = asyncio.create_task(kill_master_midway(session))
        await asyncio.wait_for(asyncio.gather(*(sender(session) for _ in range(SENDERS))), 60)
        await asyncio.wait_for(killer, 10)
        async with session.get(receiver.make_url("/readyz")) as ready:
            readiness.append(ready.status)
    load_seconds = time.monotonic() - started

    statuses = [status for _, status, _ in answers.seen]
    assert set(statuses) <= {200, 503}, "during a failover a callback is answered 200 or 503, nothing else"
    after_kill = answers.after(killed_at)
    refused = [a for a in after_kill if a[1] != 200]
    first_200_after = min((t for t, status, _ in after_kill if status == 200), default=None)
    assert refused, "callbacks sent while no master was known must not be answered 200"
    assert first_200_after is not None, "the receiver accepts callbacks again through the new master"
    assert len(answers.accepted) == ORDERS
    assert readiness == [503, 200], "/readyz: 503 while the master is gone, 200 through the new one"

    assert cluster.current_master_port() != old_master
    ids = [f"{order_id}-0-order" for order_id in orders]
    try:
        await wait_for(
            lambda: {r.headers.get("webhook-id") for r in sink.received} >= set(ids),
            seconds=30,
            what="every accepted update at the sink",
        )
    except AssertionError:
        missing = set(ids) - {r.headers.get("webhook-id") for r in sink.received}
        raise AssertionError(
            f"{len(missing)} accepted updates never delivered, e.g. {sorted(missing)[:3]}; worker "
            f"{'alive' if worker.poll() is None else 'exited'}; its log ends:\n{worker_log.read_text()[-3000:]}"
        ) from None
    assert worker.poll() is None, f"the worker did not survive the failover: {worker_log.read_text()[-2000:]}"
    stop(worker)
    delivered = {r.headers.get("webhook-id") for r in sink.received}
    assert set(ids) <= delivered
    redeliveries = len(sink.received) - len(delivered)
    with capsys.disabled():
        print(
            f"\nfailover: {ORDERS} callbacks by {SENDERS} senders in {load_seconds:.1f}s; master killed after "
            f"{KILL_AFTER_ACCEPTED} accepted; sentinels promoted a replica {promoted_at - killed_at:.2f}s after "
            f"the kill; {statuses.count(503)} answers 503 (0 other non-200, the slowest in "
            f"{answers.slowest_refusal:.2f}s); first 200 through the new master "
            f"{first_200_after - killed_at:.2f}s after the kill; all {len(ids)} accepted updates delivered "
            f"({redeliveries} delivered twice, same Idempotency-Key); worker alive throughout"
        )


async def test_with_no_master_known_a_callback_is_answered_503_and_readyz_says_so(
    make_receiver: Callable[..., Any], rsa_key: Any
) -> None:
    """Sentinels that do not answer (or know no such master): MasterNotFoundError is a 503, never a 500."""
    nowhere = (("127.0.0.1", free_port()), ("127.0.0.1", free_port()))
    receiver = await make_receiver(redis_sentinels=nowhere, redis_sentinel_master="igr-test")
    answer = await receiver.post("/callbacks/intergiro", data=token(card_order(), rsa_key), headers=JWT)
    assert answer.status == 503
    assert "Retry-After" in answer.headers
    ready = await receiver.get("/readyz")
    assert ready.status == 503
    assert (await ready.json())["redis"] == "no master known to the sentinels"


async def test_check_with_sentinels_that_know_no_such_master_fails_with_one_line(
    cluster: SentinelCluster, tmp_path: Path
) -> None:
    from tests.test_check import check

    env = {**sentinel_env(cluster), "MERCHANT_HANDLER": "json:dumps"}  # somewhere to deliver that imports
    code, lines = await check(tmp_path, **env)
    assert (code, len(lines)) == (0, 1)
    code, lines = await check(tmp_path, **{**env, "REDIS_SENTINEL_MASTER": "no-such-master"})
    assert code == 1
    assert len(lines) == 1
    assert lines[0].startswith("problem: REDIS_SENTINEL_MASTER: no sentinel in REDIS_SENTINELS names")


async def test_a_job_taken_off_the_queue_but_never_started_is_queued_again_and_delivered(
    aiohttp_server: Any, make_receiver: Callable[..., Any], redis_url: str, sync_redis: Any, rsa_key: Any,
    tmp_path: Path, request: pytest.FixtureRequest,
) -> None:  # fmt: skip
    """RQ moves a job to its intermediate list, then starts it; a worker that lost Redis in between (the
    master died) leaves it there, on no list a worker reads: the workers put it back on the queue."""
    receiver = await make_receiver()
    answer = await receiver.post("/callbacks/intergiro", data=token(card_order(), rsa_key), headers=JWT)
    assert answer.status == 200
    queue = "rq:queue:order-updates"
    assert sync_redis.lmove(queue, f"{queue}:intermediate") == b"TestOrder0000001-0-order"
    sink = Sink()
    sink_server = await aiohttp_server(sink.app())
    log = tmp_path / "worker.log"
    env = worker_env(
        redis_url, merchant_webhook_url=str(sink_server.make_url("/hooks")), merchant_webhook_secret=SECRET
    )
    worker = start_worker(env, log)
    request.addfinalizer(lambda: stop(worker))
    await wait_for(lambda: len(sink.received) == 1, what="the stranded update at the sink")
    stop(worker)
    assert [r.headers["webhook-id"] for r in sink.received] == ["TestOrder0000001-0-order"]
    assert sync_redis.llen(f"{queue}:intermediate") == 0

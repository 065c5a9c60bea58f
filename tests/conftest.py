"""Fixtures: a real Redis the suite owns, real aiohttp servers, keys to sign test callbacks, and
Intergiro's real captured callbacks as data."""

from __future__ import annotations

import asyncio
import json
import logging
import subprocess
from collections.abc import AsyncIterator, Callable, Iterator
from datetime import date
from pathlib import Path
from typing import Any

import pytest
import redis
import structlog
from aiohttp import web
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from rq import Queue
from rq.serializers import JSONSerializer

from receiver.app import create_app
from receiver.cli import main
from receiver.keys import load_public_key
from receiver.settings import Settings
from tests.processes import RedisServer, start_worker, stop, usable_external_url, worker_env
from tests.sink import Sink

# Intergiro's real callbacks and keys, copied into the repository (tests/data/intergiro/README.md).
INTERGIRO = Path(__file__).resolve().parent / "data" / "intergiro"


def real_callbacks(kind: str | None = None) -> list[dict[str, Any]]:
    lines = [
        json.loads(line) for line in (INTERGIRO / "real-callbacks.jsonl").read_text().splitlines() if line
    ]
    return [line for line in lines if kind is None or line["kind"] == kind]


@pytest.fixture(scope="session")
def redis_url_base() -> Iterator[str]:
    external = usable_external_url()
    if external:
        yield external
        redis.Redis.from_url(external).flushdb()
        return
    server = RedisServer()
    server.start()
    yield server.url
    server.cleanup()


@pytest.fixture
def redis_url(redis_url_base: str) -> Iterator[str]:
    """The suite's own Redis, emptied before each test (it holds nothing but what the tests wrote)."""
    client = redis.Redis.from_url(redis_url_base)
    client.flushdb()
    client.close()
    yield redis_url_base


@pytest.fixture
def own_redis() -> Iterator[RedisServer]:
    """A Redis of this test's own, which it may stop, start or misconfigure."""
    server = RedisServer()
    server.start()
    yield server
    server.cleanup()


@pytest.fixture
def restartable_redis() -> Iterator[RedisServer]:
    """A Redis of this test's own, to be killed mid-run and started again on the same port: it keeps what
    it holds (append-only file, fsync before every reply, as deploy/redis.conf)."""
    server = RedisServer(appendonly=True)
    server.start()
    yield server
    server.cleanup()


@pytest.fixture
def sync_redis(redis_url: str) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_url)
    yield client
    client.close()


def pem_public(private_key: Any) -> str:
    return (
        private_key.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )


@pytest.fixture(scope="session")
def rsa_key() -> rsa.RSAPrivateKey:
    """A signing key the test receivers trust (configured through INTERGIRO_PUBLIC_KEYS)."""
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture(scope="session")
def ec_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


@pytest.fixture(scope="session")
def stranger_key() -> rsa.RSAPrivateKey:
    """A well-formed key nobody trusts."""
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture
def make_settings(redis_url: str, rsa_key: Any, ec_key: Any) -> Callable[..., Settings]:
    def make(**changes: Any) -> Settings:
        base = Settings(
            redis_url=redis_url,
            intergiro_public_keys=(load_public_key(pem_public(rsa_key)), load_public_key(pem_public(ec_key))),
            log_format="console",
        )
        return base.with_changes(**changes)

    return make


@pytest.fixture
def settings(make_settings: Callable[..., Settings]) -> Settings:
    return make_settings()


@pytest.fixture
async def receiver(aiohttp_client: Any, settings: Settings) -> Any:
    """A test client of a receiver running with `settings` (production audience, test keys trusted)."""
    return await aiohttp_client(create_app(settings))


@pytest.fixture
def make_receiver(aiohttp_client: Any, make_settings: Callable[..., Settings]) -> Callable[..., Any]:
    async def make(**changes: Any) -> Any:
        return await aiohttp_client(create_app(make_settings(**changes)))

    return make


@pytest.fixture
def queue(sync_redis: redis.Redis, settings: Settings) -> Queue:
    return Queue(settings.queue_name, connection=sync_redis, serializer=JSONSerializer)


@pytest.fixture
def make_sink(aiohttp_server: Any) -> Callable[..., Any]:
    """Makes real merchant endpoints (tests/sink.py), each recording every delivery at its `url`."""

    async def make() -> Sink:
        sink = Sink()
        server = await aiohttp_server(sink.app())
        sink.url = str(server.make_url("/hooks"))
        return sink

    return make


@pytest.fixture
async def sink(make_sink: Callable[..., Any]) -> Sink:
    """A real merchant endpoint (tests/sink.py) recording every delivery, at `sink.url`."""
    made: Sink = await make_sink()
    return made


def queued_updates(client: redis.Redis, settings: Settings) -> list[dict[str, Any]]:
    """Every update job in Redis (queued or waiting behind its order's head), read the way RQ reads it."""
    from rq.job import Job

    ids = [k.decode().removeprefix("rq:job:") for k in client.scan_iter("rq:job:*")]
    return [Job.fetch(i, connection=client, serializer=JSONSerializer).args[0] for i in sorted(ids)]


@pytest.fixture
async def fake_intergiro(aiohttp_server: Any) -> AsyncIterator[Any]:
    """A fake of Intergiro's API: the verify endpoint answers the order for tokens it was told about
    (`orders`: token -> order), and `GET /v1/order?start=&end=` lists `listed` by creation day.

    `verify_answer`, when set, is awaited with the request and answers the verify call instead (a
    redirect, an endless body, another order); `gate`, when set, is an asyncio.Event every verify
    call waits for."""
    from aiohttp import web

    state: dict[str, Any] = {
        "orders": {},
        "listed": [],
        "status": None,
        "calls": 0,
        "list_calls": [],
        "auth": [],
        "verify_answer": None,
        "gate": None,
    }

    async def verify(request: web.Request) -> web.StreamResponse:
        state["calls"] += 1
        state["auth"].append(request.headers.get("Authorization"))
        if state["gate"] is not None:
            await state["gate"].wait()
        if state["verify_answer"] is not None:
            answer: web.StreamResponse = await state["verify_answer"](request)
            return answer
        if state["status"] is not None:
            return web.json_response({"status": state["status"], "type": "fake"}, status=state["status"])
        if request.headers.get("Authorization") != "Bearer test-api-key":
            return web.json_response({"status": 401, "type": "not authorized"}, status=401)
        body = (await request.read()).strip()
        order = state["orders"].get(body)
        if order is None:
            return web.json_response({"status": 400, "type": "malformed content"}, status=400)
        return web.json_response(order)

    async def list_orders(request: web.Request) -> web.Response:
        state["list_calls"].append(dict(request.query))
        if request.headers.get("Authorization") != "Bearer test-api-key":
            return web.json_response({"status": 401, "type": "not authorized"}, status=401)
        start, end = request.query["start"], request.query["end"]
        return web.json_response([o for o in state["listed"] if start <= o["created"][:10] < end])

    app = web.Application()
    app.router.add_post("/v1/worker-order/order/verify", verify)
    app.router.add_get("/v1/order", list_orders)
    server = await aiohttp_server(app)
    server.state = state
    yield server


@pytest.fixture
def remote_receiver(make_receiver: Any, fake_intergiro: Any) -> Callable[..., Any]:
    """Makes a test client of a receiver that verifies with `fake_intergiro` (remote, unless changed)."""

    async def make(**changes: Any) -> Any:
        return await make_receiver(
            **{
                "intergiro_verify": "remote",
                "intergiro_api_url": str(fake_intergiro.make_url("")).rstrip("/"),
                "intergiro_api_key": "test-api-key",
                **changes,
            }
        )

    return make


@pytest.fixture
def cli(
    redis_url: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> Callable[..., Any]:
    """Runs `intergiro-receiver ARGS` in this process with the suite's Redis; returns (exit code, stdout)."""
    monkeypatch.setenv("REDIS_URL", redis_url)
    logging_config = structlog.get_config()  # main() points structlog at the captured stderr
    handlers = list(logging.getLogger().handlers)  # and the root logger's handler at it too

    def run(*args: str) -> tuple[int, str]:
        capsys.readouterr()
        with pytest.raises(SystemExit) as exit_:
            main(list(args))
        return int(exit_.value.code or 0), capsys.readouterr().out

    yield run
    structlog.configure(**logging_config)
    for handler in [h for h in logging.getLogger().handlers if h not in handlers]:
        logging.getLogger().removeHandler(handler)


@pytest.fixture
def workers(redis_url: str, tmp_path: Path) -> Iterator[Callable[..., subprocess.Popen[bytes]]]:
    """Starts `intergiro-receiver worker` processes with the given settings; stops them after the test."""
    started: list[subprocess.Popen[bytes]] = []

    def start(*args: str, **settings: Any) -> subprocess.Popen[bytes]:
        process = start_worker(worker_env(redis_url, **settings), tmp_path / "worker.log", *args)
        started.append(process)
        return process

    yield start
    for process in started:
        stop(process)


# The days the fake order list holds orders on; an order that is no object is listed on the first.
DAYS = (date(2024, 5, 1), date(2024, 5, 2), date(2024, 5, 3))


@pytest.fixture
async def order_api(aiohttp_server: Any) -> AsyncIterator[Any]:
    """A fake of Intergiro's `GET /v1/order?start=&end=`: the orders created in [start, end)."""
    state: dict[str, Any] = {
        "orders": [],  # raw JSON values, listed by their `created` date (non-objects on every day)
        "failures": [],  # statuses answered first, one per request
        "retry_after": None,
        "status": None,  # answered to every request when set
        "paging": None,  # None (one array), "link", "next-url" or "continuation"
        "page_size": 1000,
        "gate": None,  # an asyncio.Event every request waits for
        "hang": 0,  # how many requests get no answer at all
        "requests": [],
    }

    def created_on(raw: Any, start: str, end: str) -> bool:
        if not isinstance(raw, dict) or not isinstance(raw.get("created"), str):
            return start == DAYS[0].isoformat()
        return start <= raw["created"][:10] < end

    async def list_orders(request: web.Request) -> web.Response:
        state["requests"].append(dict(request.query))
        if state["gate"] is not None:
            await state["gate"].wait()
        if state["hang"]:
            state["hang"] -= 1
            await asyncio.Event().wait()
        if request.headers.get("Authorization") != "Bearer test-api-key":
            return web.json_response({"status": 401, "type": "not authorized"}, status=401)
        if state["failures"]:
            status = state["failures"].pop(0)
            headers = {"Retry-After": state["retry_after"]} if state["retry_after"] else None
            return web.json_response({"status": status, "type": "fake"}, status=status, headers=headers)
        if state["status"] is not None:
            return web.json_response({"status": state["status"], "type": "fake"}, status=state["status"])
        start, end = request.query["start"], request.query["end"]
        orders = [o for o in state["orders"] if created_on(o, start, end)]
        page = int(request.query.get("page") or request.query.get("continuation") or 0)
        size = state["page_size"]
        chunk, more = orders[page * size : (page + 1) * size], len(orders) > (page + 1) * size
        next_url = f"/v1/order?start={start}&end={end}&page={page + 1}"
        if state["paging"] == "next-url":
            return web.json_response({"orders": chunk, "next": next_url if more else None})
        if state["paging"] == "continuation":
            return web.json_response({"data": chunk, "continuation": str(page + 1) if more else ""})
        headers = {"Link": f'<{next_url}>; rel="next"'} if more and state["paging"] == "link" else None
        return web.json_response(chunk, headers=headers)

    app = web.Application()
    app.router.add_get("/v1/order", list_orders)
    server = await aiohttp_server(app)
    server.state = state
    yield server


@pytest.fixture
def api_settings(make_settings: Callable[..., Settings], order_api: Any) -> Settings:
    return make_settings(
        intergiro_api_url=str(order_api.make_url("")).rstrip("/"), intergiro_api_key="test-api-key"
    )

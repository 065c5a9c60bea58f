"""The HTTP receiver: routes, and the one place where a rejected callback becomes an HTTP answer."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import gc
import os
import shutil
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, cast

import orjson
import structlog
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST
from redis.asyncio import Redis
from redis.asyncio.sentinel import MasterNotFoundError
from redis.commands.core import AsyncScript
from redis.exceptions import RedisError

from receiver import __version__, tracing
from receiver.clock import utc_now
from receiver.connections import async_redis, deadline, write_refusal
from receiver.error_notes import error_note, keep_error_note
from receiver.errors import (
    BadCallback,
    BodyTimeout,
    BodyTooLarge,
    CallbackRejected,
    NotTrusted,
    Unavailable,
    UnsupportedMediaType,
    clip,
)
from receiver.history import callback_note
from receiver.intake import Intake
from receiver.intergiro_api import IntergiroApi
from receiver.keys import TrustedKey
from receiver.logs import OncePer, log
from receiver.metrics.exporter import DEPLOYMENT_SCRIPT
from receiver.metrics.receiver_registry import ReceiverMetrics, multiprocess_dir
from receiver.order import OrderLimits, is_error_object, parse_order
from receiver.rediskeys import RedisKeys, configured_destination_keys
from receiver.request_ids import request_id
from receiver.settings import Settings
from receiver.supervisor import stop_signal, supervise
from receiver.verify import NoKeyVerifies, Unrepresentable, Verified, strict_json, verify_local

CALLBACK_PATH = "/callbacks/intergiro"
ACCEPTED_TYPES = ("application/jwt", "application/json")
LINGER_SECONDS = 1.0
CALLBACK_MINUTES_FLUSH_SECONDS = 5.0

SETTINGS = web.AppKey("settings", Settings)
REDIS = web.AppKey("redis", Redis)
INTAKE = web.AppKey("intake", Intake)
INTERGIRO = web.AppKey("intergiro", IntergiroApi)
METRICS = web.AppKey("metrics", ReceiverMetrics)
KEYS = web.AppKey("keys", RedisKeys)
TRUSTED_KEYS = web.AppKey("trusted_keys", tuple[TrustedKey, ...])
ORDER_ID = web.RequestKey("order_id", str)
ORDER_LIMITS = web.AppKey("order_limits", OrderLimits)
REQUEST_ID = web.RequestKey("request_id", str)
CALLBACK_LOG = web.AppKey("callback_log", structlog.typing.FilteringBoundLogger)
DEPLOYMENT_SCRIPT_KEY = web.AppKey("deployment_script", AsyncScript)
REFUSALS_LOGGED = web.AppKey("refusals_logged", OncePer)
# A Redis that refuses writes (full, read-only) refuses every callback: one error line this often says so.
REFUSAL_LOG_SECONDS = 10.0


def json_response(
    body: dict[str, Any], status: int = 200, headers: dict[str, str] | None = None
) -> web.Response:
    return web.Response(
        body=orjson.dumps(body), status=status, content_type="application/json", headers=headers
    )


def answer_rejections(
    handler: Callable[[web.Request], Awaitable[web.StreamResponse]],
) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
    """Wrap the callback handler: a CallbackRejected raised anywhere below it becomes its HTTP answer,
    logged and counted. (A decorator rather than a middleware: only the callback route rejects, and
    aiohttp's middleware chain would cost every request a few wrapper calls.)"""

    @functools.wraps(handler)
    async def answering(request: web.Request) -> web.StreamResponse:
        try:
            return await handler(request)
        except CallbackRejected as exc:
            request.app[METRICS].count_callback(f"rejected_{exc.status}")
            log.info(
                "callback rejected",
                status=exc.status,
                reason=exc.reason,
                order=request.get(ORDER_ID),
                request_id=request.get(REQUEST_ID),
                client=request.remote,
            )
            headers = {"Retry-After": str(exc.retry_after)} if isinstance(exc, Unavailable) else None
            response = json_response(
                {"status": "rejected", "error": exc.error, "reason": exc.reason}, exc.status, headers
            )
            if isinstance(exc, BodyTimeout):
                response.force_close()  # the rest of a stalled body is not worth waiting for
            return response

    return answering


async def read_body(request: web.Request, limit: int, timeout_seconds: float) -> bytes:
    """The whole body, which must arrive within `timeout_seconds` (a slow-loris client gets 408)."""
    if request.content_length is not None and request.content_length > limit:
        raise BodyTooLarge(f"body is larger than {limit} bytes")
    if request.content.is_eof():  # all of it arrived with the headers: take it, nothing to wait for
        body = request.content.read_nowait()
        if len(body) > limit:  # a chunked body has no Content-Length to refuse it by
            raise BodyTooLarge(f"body is larger than {limit} bytes")
        return body
    try:
        async with asyncio.timeout(timeout_seconds):
            return await request.read()
    except web.HTTPRequestEntityTooLarge:
        raise BodyTooLarge(f"body is larger than {limit} bytes") from None
    except TimeoutError:
        raise BodyTimeout(f"body did not arrive within {timeout_seconds:g} seconds") from None


async def verify_callback(app: web.Application, body: bytes, content_type: str) -> Verified:
    """Local, remote, or local-then-remote, as INTERGIRO_VERIFY says; times each method. An unsigned
    JSON order is trusted only as Intergiro's order list holds it (remote modes only)."""
    settings = app[SETTINGS]
    metrics = app[METRICS]
    if content_type == "application/jwt" and settings.intergiro_verify != "remote":
        keys: tuple[TrustedKey, ...] = app[TRUSTED_KEYS]
        started = time.perf_counter()
        try:
            return verify_local(body, keys, settings.expected_audience)
        except NoKeyVerifies:
            if settings.intergiro_verify == "local":
                raise
        finally:
            metrics.observe_verification("local", time.perf_counter() - started)
    if not settings.remote_verification:
        raise NotTrusted("unsigned JSON orders are trusted only with remote verification")
    started = time.perf_counter()
    try:
        if content_type == "application/jwt":
            return await app[INTERGIRO].verify_token(body)
        return await app[INTERGIRO].confirm_order(strict_json(body))
    finally:
        metrics.observe_verification("remote", time.perf_counter() - started)


def redis_failed(app: web.Application, exc: RedisError) -> Unavailable:
    """The 503 for a callback Redis did not store: not reachable, or reachable and refusing the write
    (then counted, and logged as an error at most once per REFUSAL_LOG_SECONDS)."""
    refusal = write_refusal(exc)
    if refusal is None:
        return Unavailable("redis not reachable; nothing was stored")
    app[METRICS].redis_refusals.labels(refusal.replace(" ", "_").replace("-", "_")).inc()
    held_back = app[REFUSALS_LOGGED].due()
    if held_back is not None:
        log.error("redis refused a write", refusal=refusal, error=clip(str(exc)), since_last_line=held_back)
    return Unavailable(f"redis refused the write ({refusal}); nothing was stored")


async def note_error_object(
    app: web.Application, error: dict[str, Any], received_at: str, request: str
) -> None:
    """Keep an Intergiro Error object for ops (receiver.error_notes: safe fields, cut short, bounded);
    `request`: the callback's request id."""
    note = error_note(error, received_at)
    try:
        dropped = await keep_error_note(
            app[REDIS], app[KEYS].error_notes, note, app[SETTINGS].redis_timeout_seconds
        )
    except RedisError as exc:
        raise redis_failed(app, exc) from None
    app[METRICS].error_objects.inc()
    if dropped:
        app[METRICS].error_notes_dropped.inc(dropped)
    log.warning(
        "intergiro error object received",
        error_status=note.get("status"),
        error_type=note.get("type"),
        request_id=request,
    )


async def read_callback(request: web.Request) -> tuple[str, bytes]:
    """The callback's content type (one of ACCEPTED_TYPES) and its body, stripped."""
    content_type = request.content_type.lower()
    if content_type not in ACCEPTED_TYPES:
        raise UnsupportedMediaType("send application/jwt (or application/json)")
    settings = request.app[SETTINGS]
    body = await read_body(request, settings.max_body_bytes, settings.receiver_body_timeout_seconds)
    return content_type, body.strip()


def error_object(content_type: str, body: bytes) -> dict[str, Any] | None:
    """The Intergiro Error object the body is, or None (a token, or a JSON order)."""
    if content_type != "application/json":
        return None
    try:
        parsed = strict_json(body)
    except Unrepresentable as exc:
        raise BadCallback(f"body: {exc}") from None
    except (ValueError, UnicodeDecodeError, RecursionError):
        raise BadCallback("body is not JSON") from None
    return parsed if is_error_object(parsed) else None


async def store_order(
    app: web.Application, order: dict[str, Any], verified: Verified, received_at: str, request: str, size: int
) -> list[str]:
    """Decide the order's duplicates and queue its new updates (receiver.intake); the ids queued."""
    note = callback_note(received_at, verified.verified_by, request, order.get("number"))
    trace = tracing.current()
    try:
        with trace.span("store updates") as span:
            queued = await app[INTAKE].intake_order(
                order,
                received_at=received_at,
                verified_by=verified.verified_by,
                repaired=verified.repaired,
                history=note,
                size=size,
                job_meta=trace.job_meta(),
            )
            span.set_attribute("intergiro.update_ids", queued)
            return queued
    except RedisError as exc:
        raise redis_failed(app, exc) from None


def answer_callback(
    app: web.Application, order: dict[str, Any], verified: Verified, queued: list[str], request: str
) -> web.Response:
    """Count and log the callback's outcome and answer it: accepted (with the ids queued) or duplicate."""
    outcome = "accepted" if queued else "duplicate"
    app[METRICS].count_callback(outcome)
    app[METRICS].updates_queued.inc(len(queued))
    app[CALLBACK_LOG].info(
        "callback",
        order=order["id"],
        outcome=outcome,
        queued=queued,
        verified_by=verified.verified_by,
        request_id=request,
    )
    if not queued:
        return json_response({"status": "duplicate", "order": order["id"]})
    events = len(order.get("event") or ())
    return json_response(
        {
            "status": "accepted",
            "order": order["id"],
            "queued": queued,
            "duplicates": max(events, 1) - len(queued),
        }
    )


async def receive_callback(request: web.Request) -> web.Response:
    """POST /callbacks/intergiro: read, verify, decide duplicates and store, answer; 200 only once it is
    in Redis. Every refusal is raised as a CallbackRejected, answered by `answer_rejections`."""
    app = request.app
    request[REQUEST_ID] = request_id(request.headers)
    content_type, body = await read_callback(request)
    received_at = utc_now()
    error = error_object(content_type, body)
    if error is not None:
        await note_error_object(app, error, received_at, request[REQUEST_ID])
        app[METRICS].count_callback("error_noted")
        return json_response({"status": "error-noted"})
    with tracing.current().span("verify callback") as span:
        verified = await verify_callback(app, body, content_type)
        span.set_attribute("intergiro.verified_by", verified.verified_by)
    order = parse_order(verified.order, app[ORDER_LIMITS])
    request[ORDER_ID] = order["id"]
    queued = await store_order(app, order, verified, received_at, request[REQUEST_ID], len(body))
    return answer_callback(app, order, verified, queued, request[REQUEST_ID])


def callback_trace(request: web.Request) -> dict[str, Any]:
    """What a callback's span names: its order and request id."""
    return {tracing.ORDER: request.get(ORDER_ID), tracing.REQUEST: request.get(REQUEST_ID)}


async def healthz(request: web.Request) -> web.Response:
    """Alive; names the process that answered (with `serve --processes N`, one of N)."""
    return json_response({"status": "ok", "pid": os.getpid()})


async def readyz(request: web.Request) -> web.Response:
    try:
        async with deadline(request.app[REDIS], request.app[SETTINGS].redis_timeout_seconds):
            await request.app[REDIS].ping()
    except MasterNotFoundError:
        return json_response({"status": "unavailable", "redis": "no master known to the sentinels"}, 503)
    except RedisError:
        return json_response({"status": "unavailable", "redis": "not reachable"}, 503)
    return json_response({"status": "ready"})


async def metrics(request: web.Request) -> web.Response:
    """This process's own metrics; and the deployment's, when this process holds the exporter lease
    (see receiver.metrics: summed over every receiver and worker, each figure counts once)."""
    app = request.app
    deployment = app[METRICS].deployment
    keys, args = deployment.keys_and_args()
    try:
        async with deadline(app[REDIS], app[SETTINGS].redis_timeout_seconds):
            deployment.update(await app[DEPLOYMENT_SCRIPT_KEY](keys=keys, args=args))
            if deployment.held:
                deployment.memory(await app[REDIS].info("memory"))
    except RedisError:
        deployment.lost()  # /readyz tells that Redis is gone
    return web.Response(body=app[METRICS].render(), headers={"Content-Type": CONTENT_TYPE_LATEST})


async def flush_callback_minutes(app: web.Application, stopping: asyncio.Event) -> None:
    """Every few seconds, add the callbacks counted per minute to Redis (the ops console's overview),
    until `stopping` is set (a flag, not only cancellation: redis-py may swallow a cancellation)."""
    while not stopping.is_set():
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stopping.wait(), CALLBACK_MINUTES_FLUSH_SECONDS)
        if stopping.is_set():
            return
        with contextlib.suppress(RedisError):
            await app[METRICS].minutes.flush(app[REDIS], app[KEYS])


async def _resources(app: web.Application) -> AsyncIterator[None]:
    settings = app[SETTINGS]
    redis = async_redis(settings)
    app[REDIS] = redis
    app[DEPLOYMENT_SCRIPT_KEY] = redis.register_script(DEPLOYMENT_SCRIPT)
    # The intake's own client has no socket timeout: it bounds each batch itself (see Intake._run).
    intake_redis = async_redis(settings, timeout=None)
    app[INTAKE] = Intake(
        intake_redis,
        app[KEYS],
        settings.dedup_ttl_seconds,
        settings.redis_min_replicas,
        history_ttl=settings.history_retention_seconds,
        destinations=settings.destinations,
        timeout_seconds=settings.redis_timeout_seconds,
    )
    app[INTERGIRO] = IntergiroApi(settings)
    # Bound once as logging is now configured: the module's lazy proxy looks the configuration up on
    # every call, a cost the one line per callback need not pay.
    app[CALLBACK_LOG] = log.bind()
    stopping = asyncio.Event()
    flusher = asyncio.create_task(flush_callback_minutes(app, stopping))
    yield
    stopping.set()
    flusher.cancel()
    await asyncio.wait([flusher], timeout=CALLBACK_MINUTES_FLUSH_SECONDS)  # bounded, whatever Redis does
    await app[INTERGIRO].close()
    await intake_redis.aclose()
    await redis.aclose()


def create_app(settings: Settings) -> web.Application:
    """The receiver's aiohttp application, with its Redis client and HTTP session opened on startup."""
    app = web.Application(client_max_size=settings.max_body_bytes)
    app[SETTINGS] = settings
    keys = RedisKeys.of(settings)
    app[METRICS] = ReceiverMetrics(keys, configured_destination_keys(settings))
    app[KEYS] = keys
    app[TRUSTED_KEYS] = settings.trusted_keys
    app[REFUSALS_LOGGED] = OncePer(REFUSAL_LOG_SECONDS)
    app[ORDER_LIMITS] = settings.order_limits
    app.cleanup_ctx.append(_resources)
    app.router.add_post(
        CALLBACK_PATH, tracing.current().callback(answer_rejections(receive_callback), callback_trace)
    )
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics)
    return app


# The request head a client may send: a request line or header line of at most HEADER_LINE_BYTES, at
# most MAX_HEADERS header lines (so at most 32 x 4 KiB = 128 KiB of head per connection, where aiohttp's
# defaults allow 128 x 8 KiB); past them aiohttp answers 400 itself and closes the connection.
HEADER_LINE_BYTES = 4096
MAX_HEADERS = 32


def server_options(settings: Settings) -> dict[str, Any]:
    """aiohttp server options (for `AppRunner`): a connection without a complete request (idle, or
    headers trickled in slowly) is closed after the idle timeout, where aiohttp's default would keep
    it for an hour; after an early answer (408, 413) what the client still sends is read and dropped
    for at most LINGER_SECONDS, so it sees the answer rather than a reset; the request head is bounded."""
    return {
        "keepalive_timeout": settings.receiver_idle_timeout_seconds,
        "lingering_time": LINGER_SECONDS,
        "access_log": None,
        "max_line_size": HEADER_LINE_BYTES,
        "max_field_size": HEADER_LINE_BYTES,
        "max_headers": MAX_HEADERS,
    }


_BUSY_BODY = b'{"status":"rejected","error":"unavailable","reason":"too many connections"}'
BUSY_ANSWER = (
    b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\nRetry-After: 1\r\n"
    b"Connection: close\r\nContent-Length: " + str(len(_BUSY_BODY)).encode() + b"\r\n\r\n" + _BUSY_BODY
)


class _Busy(asyncio.Protocol):
    """A connection past the process's limit: answered 503 at once. What the client still sends is
    read and dropped for at most LINGER_SECONDS (closing on unread data would reset the connection
    before the client read the answer), keeping nothing."""

    def connection_made(self, base: asyncio.BaseTransport) -> None:
        transport = cast(asyncio.Transport, base)  # a stream server's transport (uvloop's is no subclass)
        transport.write(BUSY_ANSWER)
        if transport.can_write_eof():
            transport.write_eof()
        asyncio.get_running_loop().call_later(LINGER_SECONDS, transport.close)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        pass

    def eof_received(self) -> bool:
        self.transport.close()
        return False


async def listen(
    runner: web.AppRunner, host: str, port: int, max_connections: int, reuse_port: bool = False
) -> asyncio.Server:
    """Accept connections for a set-up runner on host:port, at most `max_connections` open at once
    (each past them is answered 503 and closed, and counted). aiohttp's sites have no such limit, so
    the listening socket is asyncio's own, serving the runner's public `server`. With `reuse_port`,
    other processes bind the same port (SO_REUSEPORT) and the kernel spreads connections over them."""
    server = runner.server
    assert server is not None, "set the runner up first"
    refused = runner.app[METRICS].connections_refused

    def connection() -> asyncio.Protocol:
        if len(server.connections) >= max_connections:
            refused.inc()
            return _Busy()
        return server()

    return await asyncio.get_running_loop().create_server(
        connection, host, port, reuse_address=True, reuse_port=reuse_port or None
    )


def event_loop() -> asyncio.AbstractEventLoop:
    """uvloop where it is installed (Linux, macOS): its C event loop and transports cut the receiver's
    CPU per callback; asyncio's own loop elsewhere."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency wherever it builds
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


async def freeze_startup_objects(app: web.Application) -> None:
    """Move everything made at start (modules, the app, its clients: tens of thousands of objects) out
    of the garbage collector's reach: a full collection over them stalls every callback in flight, and
    was the main part of the receiver's p99 latency."""
    gc.collect()
    gc.freeze()


def serve(settings: Settings, processes: int = 1) -> None:
    """Serve until SIGTERM/SIGINT: in this process, or in `processes` forked ones (0: one per core)
    sharing the port through SO_REUSEPORT, each with its own event loop, stopped together."""
    count = processes or os.cpu_count() or 1
    log.info(
        "receiver starting",
        host=settings.receiver_host,
        port=settings.receiver_port,
        processes=count,
        version=__version__,
        settings=settings.summary(),
        tracing=tracing.status(settings),
    )
    if count == 1:
        _serve_here(settings, reuse_port=False)
        return
    code = _serve_forked(settings, count)
    log.info("receivers stopped", processes=count, exit_code=code)
    raise SystemExit(code)


def _serve_here(settings: Settings, reuse_port: bool) -> None:
    loop = event_loop()
    try:
        loop.run_until_complete(_serve(settings, reuse_port))
    finally:
        loop.close()


def _serve_forked(settings: Settings, count: int) -> int:
    """`count` receivers forked and supervised together (receiver.supervisor): stopped together by
    SIGTERM or SIGINT, finishing their requests in flight; one that dies on its own stops the others
    too (exit 1), so the supervisor above restarts the whole set."""

    def receiver() -> int:
        _serve_here(settings, reuse_port=True)
        return 0

    try:
        return supervise([receiver] * count, "receiver", together=True)
    finally:
        shared_folder = multiprocess_dir()
        if shared_folder:  # the processes' metric files: their counts end with them
            shutil.rmtree(shared_folder, ignore_errors=True)


async def _serve(settings: Settings, reuse_port: bool = False) -> None:
    """Run until SIGTERM or SIGINT, then stop accepting and let the requests in flight finish."""
    tracing.start(settings, "serve")
    app = create_app(settings)
    app.on_startup.append(freeze_startup_objects)
    runner = web.AppRunner(app, handle_signals=False, **server_options(settings))
    await runner.setup()
    stop = stop_signal()
    try:
        server = await listen(
            runner,
            settings.receiver_host,
            settings.receiver_port,
            settings.receiver_max_connections,
            reuse_port=reuse_port,
        )
        try:
            await stop.wait()
        finally:
            server.close()  # no new connections; the runner's cleanup ends the open ones
    finally:
        await runner.cleanup()
        await asyncio.to_thread(tracing.current().shutdown)  # the spans still waiting, sent
        log.info("receiver stopped")

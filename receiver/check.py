"""`intergiro-receiver check`: can this configuration work? It tries what it can (Redis, the verify
endpoint, the merchant's and every destination's URL and handler) and prints one line per problem, all on stdout in one
format (`problem: VARIABLE: what is wrong`), and exits 1 if there is any; else one `ok:` line."""

from __future__ import annotations

import asyncio
import base64
import importlib
from dataclasses import dataclass
from typing import Any

import aiohttp
import orjson
from redis.asyncio import Redis
from redis.asyncio.sentinel import MasterNotFoundError
from redis.exceptions import AuthenticationError, RedisError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from receiver.connections import async_redis, deadline
from receiver.destinations import MERCHANT, Destination
from receiver.intergiro_api import new_session, verify_url
from receiver.order import is_error_object
from receiver.settings import Settings

REDIS_CHECK_SECONDS = 3.0
# A well-formed token no key signed: the verify endpoint can only judge it, and how it answers says
# whether the key was taken (Intergiro's Error object) or refused (401/403).
PROBE_TOKEN = b".".join(
    base64.urlsafe_b64encode(part).rstrip(b"=")
    for part in (
        b'{"alg":"RS256","typ":"JWT"}',
        b'{"id":"CheckProbe000000","iss":"payfunc","aud":"production","iat":0}',
        b"not a signature",
    )
)


@dataclass
class Findings:
    problems: list[str]
    redis: str = ""  # which Redis answered: "7.2.4 at host:6379 db 0"
    merchant: str = ""


def redis_variable(settings: Settings) -> str:
    return "REDIS_SENTINELS" if settings.redis_sentinels else "REDIS_URL"


async def redis_address(client: Redis) -> str:
    """host:port db N of the Redis a connection of `client` reaches (the master, with Sentinel)."""
    pool = client.connection_pool
    connection: Any = await pool.get_connection()  # type: ignore[no-untyped-call]
    try:
        where = getattr(connection, "path", "") or f"{connection.host}:{connection.port}"
        return f"{where} db {connection.db}"
    finally:
        await pool.release(connection)


def redis_problem(exc: RedisError, settings: Settings, where: str) -> str:
    """Redis's own reason, in words an operator acts on."""
    variable = redis_variable(settings)
    text = str(exc) or type(exc).__name__
    lowered = text.lower()
    if any(sign in lowered for sign in ("noauth", "authentication required", "already authenticated")):
        return f"{variable}: Redis at {where} requires a password, and REDIS_URL gives none"
    if isinstance(exc, AuthenticationError) or "wrongpass" in lowered or "invalid password" in lowered:
        return f"{variable}: Redis at {where} refused the username or password ({text})"
    if "db index is out of range" in lowered or "invalid database" in lowered:
        return f"{variable}: Redis at {where} has no such database ({text})"
    if "ssl" in lowered or "tls" in lowered or "wrong version number" in lowered:
        return (
            f"{variable}: TLS with Redis at {where} failed: rediss:// against a Redis without TLS? ({text})"
        )
    if isinstance(exc, RedisTimeoutError) and settings.redis_url.startswith("rediss:"):
        return (
            f"{variable}: TLS with Redis at {where} failed: no handshake within {REDIS_CHECK_SECONDS:g} s "
            "(rediss:// against a Redis without TLS?)"
        )
    if isinstance(exc, RedisTimeoutError):
        return f"{variable}: Redis at {where} did not answer within {REDIS_CHECK_SECONDS:g} s"
    if isinstance(exc, ResponseError):
        return f"{variable}: Redis at {where} answered an error: {text}"
    return f"{variable}: cannot reach Redis at {where}: {text}"


def configured_redis(settings: Settings) -> str:
    """Where the settings point (before anything answered): for the messages."""
    if settings.redis_sentinels:
        sentinels = ",".join(f"{host}:{port}" for host, port in settings.redis_sentinels)
        return f"master {settings.redis_sentinel_master!r} of sentinels {sentinels}"
    from urllib.parse import urlparse

    url = urlparse(settings.redis_url)
    if url.scheme == "unix":
        return url.path
    db = url.path.lstrip("/") or "0"
    return f"{url.hostname or 'localhost'}:{url.port or 6379} db {db}"


async def check_redis(settings: Settings, findings: Findings) -> None:
    client = async_redis(settings, timeout=REDIS_CHECK_SECONDS)
    where = configured_redis(settings)
    try:
        async with deadline(client, REDIS_CHECK_SECONDS * 2):
            info = await client.info("server")
            where = await redis_address(client)
        findings.redis = f"Redis {info.get('redis_version', '?')} at {where}"
    except MasterNotFoundError:
        findings.problems.append(
            f"REDIS_SENTINEL_MASTER: no sentinel in REDIS_SENTINELS names a reachable master "
            f"{settings.redis_sentinel_master!r} (sentinels down, a wrong name, or a failover under way)"
        )
    except RedisError as exc:
        findings.problems.append(redis_problem(exc, settings, where))
    finally:
        await client.aclose()


def is_error_answer(text: bytes) -> bool:
    """An answer that is an Intergiro Error object (`{status, type, ...}`): the API judged the request."""
    try:
        return is_error_object(orjson.loads(text))
    except orjson.JSONDecodeError:
        return False


async def check_verify_endpoint(settings: Settings, findings: Findings) -> None:
    """The key is taken when the endpoint judges the probe token: a 2xx, or Intergiro's own Error object
    about the token; 401/403 refuse the key; anything else is not (or not only) Intergiro's API."""
    url = verify_url(settings.intergiro_api_url)
    try:
        async with (
            new_session(settings) as session,
            session.post(
                url,
                data=PROBE_TOKEN,
                headers={
                    "Content-Type": "application/jwt",
                    "Authorization": f"Bearer {settings.intergiro_api_key}",
                },
                timeout=aiohttp.ClientTimeout(total=settings.intergiro_api_timeout_seconds),
                allow_redirects=False,
            ) as answer,
        ):
            status = answer.status
            body = await answer.content.read(65536)
    except (aiohttp.ClientError, TimeoutError, OSError) as exc:
        reason = str(exc) or type(exc).__name__
        findings.problems.append(f"INTERGIRO_API_URL: cannot reach the verify endpoint {url}: {reason}")
        return
    if status in (401, 403):
        findings.problems.append(f"INTERGIRO_API_KEY: the verify endpoint refused the key ({status})")
    elif 300 <= status < 400:
        findings.problems.append(
            f"INTERGIRO_API_URL: the verify endpoint answered a redirect ({status}); "
            "the receiver follows none: set the URL it points to"
        )
    elif status >= 500:
        findings.problems.append(f"INTERGIRO_API_URL: the verify endpoint answered {status}")
    elif 400 <= status < 500 and not is_error_answer(body):
        findings.problems.append(
            f"INTERGIRO_API_URL: {url} answered {status} without Intergiro's error object: "
            "not Intergiro's verify endpoint, so the key is not known to work"
        )


def check_destination_url(destination: Destination) -> str | None:
    """HEAD a destination's URL (the merchant's, MERCHANT_WEBHOOK_URL, or a DESTINATION_<NAME>_URL) as
    the workers reach it (its proxy, its client certificate): any HTTP answer is reachable; returns the
    problem, naming the variable, or None."""
    from workers.merchant_http import ConnectionOptions, MerchantConnection, PostFailed

    name = destination_variable(destination.name, "URL")
    timeout = destination_variable(destination.name, "TIMEOUT_SECONDS")
    d = destination
    try:
        connection = MerchantConnection(d.url, d.timeout_seconds, ConnectionOptions.of(d))
    except ValueError as exc:
        return f"{name}: {exc}"
    try:
        connection.reach()
    except PostFailed as exc:
        if exc.answered:
            return None  # it answered, if not in good HTTP: reachable, the workers will say more
        if exc.timed_out:
            return (
                f"{name}: {connection.redacted_url} did not answer within {d.timeout_seconds:g} s ({timeout})"
            )
        return f"{name}: cannot reach {connection.redacted_url}: {exc.detail}"
    return None


def destination_variable(destination: str, name: str) -> str:
    """The setting a destination's `name` comes from: MERCHANT_WEBHOOK_URL, DESTINATION_ERP_URL, ..."""
    if destination == MERCHANT:
        merchant = {"URL": "MERCHANT_WEBHOOK_URL", "HANDLER": "MERCHANT_HANDLER"}
        return merchant.get(name, f"DELIVERY_{name}")
    return f"DESTINATION_{destination.upper().replace('-', '_')}_{name}"


def check_handler(path: str, variable: str = "MERCHANT_HANDLER") -> str | None:
    module_name, _, function_name = path.partition(":")
    try:
        function = getattr(importlib.import_module(module_name), function_name)
    except Exception as exc:  # whatever importing the merchant's module raises
        return f"{variable}: cannot import {path}: {type(exc).__name__}: {exc}"
    if not callable(function):
        return f"{variable}: {path} is not callable"
    return None


async def find_problems(settings: Settings) -> Findings:
    findings = Findings(problems=[])
    await check_redis(settings, findings)
    if settings.remote_verification:
        await check_verify_endpoint(settings, findings)
    if (
        not settings.merchant_webhook_url
        and not settings.merchant_handler
        and not settings.extra_destinations
    ):
        findings.problems.append(
            "MERCHANT_WEBHOOK_URL or MERCHANT_HANDLER: set at least one (or DESTINATIONS), or workers have "
            "nowhere to deliver"
        )
    for destination in settings.destinations:  # the merchant's and every DESTINATIONS entry's
        if destination.url:
            problem = await asyncio.to_thread(check_destination_url, destination)
            if problem:
                findings.problems.append(problem)
        if destination.handler:
            problem = check_handler(destination.handler, destination_variable(destination.name, "HANDLER"))
            if problem:
                findings.problems.append(problem)
    return findings


def report(problems: list[str]) -> int:
    """Each problem on its own line of stdout, in the one format; 1 when there is any."""
    for problem in problems:
        print(f"problem: {problem}")
    return 1 if problems else 0


def run_check(settings: Settings) -> int:
    findings = asyncio.run(find_problems(settings))
    if findings.problems:
        return report(findings.problems)
    print(
        f"ok: {findings.redis}, verification {settings.intergiro_verify}, "
        f"environment {settings.intergiro_environment}"
    )
    return 0

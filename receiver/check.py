"""`intergiro-receiver check`: can this configuration work? One line per problem, exit 1 if any."""

from __future__ import annotations

import asyncio

import aiohttp
from redis.asyncio.sentinel import MasterNotFoundError
from redis.exceptions import RedisError

from receiver.connections import async_redis
from receiver.intergiro_api import new_session, verify_url
from receiver.settings import Settings


async def find_problems(settings: Settings) -> list[str]:
    problems = []
    redis = async_redis(settings, timeout=3)
    try:
        await redis.ping()
    except MasterNotFoundError:
        problems.append(
            f"REDIS_SENTINEL_MASTER: no sentinel in REDIS_SENTINELS names a reachable master "
            f"{settings.redis_sentinel_master!r} (sentinels down, a wrong name, or a failover under way)"
        )
    except RedisError as exc:
        where = "REDIS_SENTINELS" if settings.redis_sentinels else "REDIS_URL"
        problems.append(f"{where}: cannot reach Redis ({type(exc).__name__})")
    finally:
        await redis.aclose()
    if settings.remote_verification:
        url = verify_url(settings.intergiro_api_url)
        try:
            async with (
                new_session(settings) as session,
                session.post(
                    url,
                    data=b"check",
                    headers={
                        "Content-Type": "application/jwt",
                        "Authorization": f"Bearer {settings.intergiro_api_key}",
                    },
                    timeout=aiohttp.ClientTimeout(total=settings.intergiro_api_timeout_seconds),
                    allow_redirects=False,
                ) as answer,
            ):
                if answer.status in (401, 403):
                    problems.append(
                        f"INTERGIRO_API_KEY: the verify endpoint refused the key ({answer.status})"
                    )
                elif answer.status >= 500:
                    problems.append(f"INTERGIRO_API_URL: the verify endpoint answered {answer.status}")
                elif 300 <= answer.status < 400:
                    problems.append(
                        f"INTERGIRO_API_URL: the verify endpoint answered a redirect ({answer.status}); "
                        "the receiver follows none: set the URL it points to"
                    )
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            problems.append(f"INTERGIRO_API_URL: cannot reach the verify endpoint ({type(exc).__name__})")
    if (
        not settings.merchant_webhook_url
        and not settings.merchant_handler
        and not settings.extra_destinations
    ):
        problems.append(
            "MERCHANT_WEBHOOK_URL or MERCHANT_HANDLER: set at least one (or DESTINATIONS), or workers have "
            "nowhere to deliver"
        )
    return problems


def run_check(settings: Settings) -> int:
    problems = asyncio.run(find_problems(settings))
    for problem in problems:
        print(f"problem: {problem}")
    if not problems:
        print(
            f"ok: Redis reachable, verification {settings.intergiro_verify}, environment {settings.intergiro_environment}"
        )
    return 1 if problems else 0

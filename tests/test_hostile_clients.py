"""Slow and hostile clients against a real server socket: stalled bodies and stalled headers are cut off,
hundreds of idle connections cost little, and valid callbacks are answered through a flood of forgeries.

Timeouts here are short so the tests stay fast; the bounds asserted are generous (they catch "never",
not "slower than usual"). Latency under a flood is measured by `bench/hostile.py`, not here.
"""

from __future__ import annotations

import asyncio
import tracemalloc
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
from aiohttp import web

from receiver.app import create_app, server_options
from receiver.settings import Settings
from tests.helpers import card_order, token

PATH = "/callbacks/intergiro"
IDLE_TIMEOUT = 0.5
BODY_TIMEOUT = 0.5
GENEROUS = 10  # seconds: the connection must be gone long before this


@pytest.fixture
async def server(make_settings: Callable[..., Settings]) -> AsyncIterator[tuple[str, int]]:
    """A real receiver on a free port, in the test's event loop, with short client timeouts."""
    settings = make_settings(
        receiver_idle_timeout_seconds=IDLE_TIMEOUT, receiver_body_timeout_seconds=BODY_TIMEOUT
    )
    runner = web.AppRunner(create_app(settings), **server_options(settings))
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    host, port = runner.addresses[0][:2]
    yield host, port
    await runner.cleanup()


def request_head(length: int) -> bytes:
    return (
        f"POST {PATH} HTTP/1.1\r\nHost: receiver\r\nContent-Type: application/jwt\r\n"
        f"Content-Length: {length}\r\n\r\n"
    ).encode()


async def read_until_closed(reader: asyncio.StreamReader) -> bytes:
    """Everything the server sends until it closes the connection (fails the test after GENEROUS)."""
    return await asyncio.wait_for(reader.read(), GENEROUS)


async def post(server: tuple[str, int], body: bytes) -> tuple[int, bytes]:
    """One POST on a fresh raw connection; the status and the whole answer."""
    reader, writer = await asyncio.open_connection(*server)
    writer.write(
        request_head(len(body)).replace(b"HTTP/1.1\r\n", b"HTTP/1.1\r\nConnection: close\r\n") + body
    )
    await writer.drain()
    answer = await read_until_closed(reader)
    writer.close()
    return int(answer.split(b" ", 2)[1]), answer


async def test_a_body_that_never_finishes_is_answered_408_and_the_connection_closed(
    server: tuple[str, int], sync_redis: Any
) -> None:
    reader, writer = await asyncio.open_connection(*server)
    writer.write(request_head(5000) + b"eyJhbGciOi")  # headers, then a tenth of a token, then nothing
    await writer.drain()
    answer = await read_until_closed(reader)
    assert answer.startswith(b"HTTP/1.1 408"), answer
    assert b"Connection: close" in answer
    assert reader.at_eof()
    assert list(sync_redis.scan_iter("rq:*")) == []
    writer.close()


async def test_a_body_trickled_byte_by_byte_is_cut_off_though_bytes_keep_coming(
    server: tuple[str, int],
) -> None:
    reader, writer = await asyncio.open_connection(*server)
    writer.write(request_head(5000))

    async def trickle() -> None:
        for _ in range(int(GENEROUS / 0.05)):
            writer.write(b"a")
            await writer.drain()
            await asyncio.sleep(0.05)

    trickler = asyncio.create_task(trickle())
    try:
        answer = await read_until_closed(reader)
    finally:
        trickler.cancel()
    assert answer.startswith(b"HTTP/1.1 408"), answer
    writer.close()


async def test_headers_that_never_finish_get_the_connection_closed(server: tuple[str, int]) -> None:
    reader, writer = await asyncio.open_connection(*server)
    writer.write(b"POST /callbacks/intergiro HTTP/1.1\r\nHost: receiver\r\nContent-Ty")
    await writer.drain()
    assert await read_until_closed(reader) == b""  # closed without an answer
    writer.close()


async def test_five_hundred_idle_connections_cost_little_and_valid_callbacks_are_still_answered(
    server: tuple[str, int], rsa_key: Any
) -> None:
    await post(server, token(card_order("WarmUpOrder00001"), rsa_key))  # warm up before measuring
    tracemalloc.start()
    try:
        before, _ = tracemalloc.get_traced_memory()
        idle = [await asyncio.open_connection(*server) for _ in range(500)]
        await asyncio.sleep(0.05)  # let the server accept them all
        answers = [await post(server, token(card_order(f"IdleTestOrder{n:03d}"), rsa_key)) for n in range(5)]
        during, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert [status for status, _ in answers] == [200] * 5
    per_connection = (during - before) / 500
    print(f"500 idle connections: {per_connection / 1024:.1f} KiB each (server and client side)")
    assert per_connection < 64 * 1024
    closed = await asyncio.gather(*(read_until_closed(reader) for reader, _ in idle))
    assert closed == [b""] * 500  # every idle connection is closed by the server's idle timeout
    for _, writer in idle:
        writer.close()


async def test_valid_callbacks_during_a_flood_of_forged_tokens_are_all_accepted(
    server: tuple[str, int], rsa_key: Any, stranger_key: Any, sync_redis: Any
) -> None:
    forged = token(card_order("ForgedOrder00001"), stranger_key)
    flooding = True

    async def flood() -> list[int]:
        statuses = []
        while flooding:
            statuses.append((await post(server, forged))[0])
        return statuses

    flooders = [asyncio.create_task(flood()) for _ in range(8)]
    valid = [await post(server, token(card_order(f"FloodTestOrder{n:02d}"), rsa_key)) for n in range(20)]
    flooding = False
    refused = [status for statuses in await asyncio.gather(*flooders) for status in statuses]
    assert [status for status, _ in valid] == [200] * 20
    assert refused and set(refused) == {401}
    assert sync_redis.llen("rq:queue:order-updates") == 20

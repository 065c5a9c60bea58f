"""`intergiro-receiver check` says whether a configuration can work: exit 0, or 1 with one line per problem."""

from __future__ import annotations

import asyncio
import base64
import os
import sys
from pathlib import Path
from typing import Any

from tests.redis_server import free_port

WEBHOOK = {
    "MERCHANT_WEBHOOK_URL": "http://127.0.0.1:9/webhooks",
    "MERCHANT_WEBHOOK_SECRET": "whsec_" + base64.b64encode(b"s" * 32).decode(),
}


async def check(cwd: Path, **env: str) -> tuple[int, list[str]]:
    """Run the real command in a folder without `.env`, with only `env` (and PATH) set."""
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "receiver", "check",
        cwd=cwd, env={"PATH": os.environ["PATH"], **env},
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip
    out, _ = await process.communicate()
    return process.returncode or 0, out.decode().splitlines()


async def test_valid_settings_and_a_reachable_redis_pass(redis_url: str, tmp_path: Path) -> None:
    code, lines = await check(tmp_path, REDIS_URL=redis_url, **WEBHOOK)
    assert (code, len(lines)) == (0, 1)
    assert lines[0].startswith("ok: Redis reachable")


async def test_an_unreachable_redis_fails_with_one_line_naming_redis_url(tmp_path: Path) -> None:
    code, lines = await check(tmp_path, REDIS_URL=f"redis://127.0.0.1:{free_port()}/0", **WEBHOOK)
    assert code == 1
    assert [line.split(":")[:2] for line in lines] == [["problem", " REDIS_URL"]]


async def test_a_verify_endpoint_refusing_the_api_key_fails_naming_the_key(
    redis_url: str, tmp_path: Path, fake_intergiro: Any
) -> None:
    remote = {"INTERGIRO_VERIFY": "remote", "INTERGIRO_API_URL": str(fake_intergiro.make_url("/"))}
    code, lines = await check(
        tmp_path, REDIS_URL=redis_url, INTERGIRO_API_KEY="wrong-key", **remote, **WEBHOOK
    )
    assert code == 1
    assert lines == ["problem: INTERGIRO_API_KEY: the verify endpoint refused the key (401)"]
    assert fake_intergiro.state["auth"] == ["Bearer wrong-key"]


async def test_a_verify_endpoint_accepting_the_api_key_passes(
    redis_url: str, tmp_path: Path, fake_intergiro: Any
) -> None:
    remote = {"INTERGIRO_VERIFY": "remote", "INTERGIRO_API_URL": str(fake_intergiro.make_url("/"))}
    code, lines = await check(
        tmp_path, REDIS_URL=redis_url, INTERGIRO_API_KEY="test-api-key", **remote, **WEBHOOK
    )
    assert (code, lines[0].split(",")[0]) == (0, "ok: Redis reachable")


async def test_a_verify_endpoint_redirecting_fails_naming_the_url(
    redis_url: str, tmp_path: Path, fake_intergiro: Any
) -> None:
    from aiohttp import web

    async def redirect(request: web.Request) -> web.Response:
        return web.Response(status=302, headers={"Location": "http://127.0.0.1:9/elsewhere"})

    fake_intergiro.state["verify_answer"] = redirect
    remote = {"INTERGIRO_VERIFY": "remote", "INTERGIRO_API_URL": str(fake_intergiro.make_url("/"))}
    code, lines = await check(
        tmp_path, REDIS_URL=redis_url, INTERGIRO_API_KEY="test-api-key", **remote, **WEBHOOK
    )
    assert code == 1
    assert [line.split(":")[:2] for line in lines] == [["problem", " INTERGIRO_API_URL"]]
    assert "redirect (302)" in lines[0]


async def test_a_bad_setting_fails_with_one_line_naming_the_variable(tmp_path: Path) -> None:
    code, lines = await check(tmp_path, RECEIVER_PORT="eighty")
    assert code == 1
    assert lines == ["intergiro-receiver: configuration error: RECEIVER_PORT: 'eighty' is not a whole number"]

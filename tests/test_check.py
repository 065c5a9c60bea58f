"""`intergiro-receiver check` says whether a configuration can work: exit 0, or 1 with one line per problem."""

from __future__ import annotations

import asyncio
import base64
import os
import re
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import redis
from aiohttp import web

from tests.processes import RedisServer, free_port

WEBHOOK = {
    "MERCHANT_WEBHOOK_URL": "",  # set per test to a server that listens (see `merchant`)
    "MERCHANT_WEBHOOK_SECRET": "whsec_" + base64.b64encode(b"s" * 32).decode(),
}


@pytest.fixture(autouse=True)
async def merchant(aiohttp_server: Any) -> AsyncIterator[str]:
    """A merchant that answers 404 to everything (any answer is "reachable"); its URL goes in WEBHOOK."""
    server = await aiohttp_server(web.Application())
    WEBHOOK["MERCHANT_WEBHOOK_URL"] = str(server.make_url("/webhooks"))
    yield WEBHOOK["MERCHANT_WEBHOOK_URL"]
    WEBHOOK["MERCHANT_WEBHOOK_URL"] = ""


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
    assert (code, len(lines)) == (0, 1), lines
    port, db = redis_url.rsplit(":", 1)[1].split("/")
    assert re.fullmatch(rf"ok: Redis \d+\.\d+\.\d+ at 127\.0\.0\.1:{port} db {db}, .*", lines[0]), lines


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
    assert (code, lines[0].split(" ")[:2]) == (0, ["ok:", "Redis"])


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
    assert lines == ["problem: RECEIVER_PORT: 'eighty' is not a whole number"]


def problems_of(lines: list[str]) -> list[str]:
    assert all(line.startswith("problem: ") for line in lines), lines
    return [line.removeprefix("problem: ") for line in lines]


async def test_a_merchant_url_nothing_listens_on_is_a_problem(redis_url: str, tmp_path: Path) -> None:
    url = f"http://127.0.0.1:{free_port()}/webhooks"
    code, lines = await check(tmp_path, REDIS_URL=redis_url, **{**WEBHOOK, "MERCHANT_WEBHOOK_URL": url})
    assert code == 1
    [problem] = problems_of(lines)
    assert problem.startswith(f"MERCHANT_WEBHOOK_URL: cannot reach {url}: "), problem
    assert "refused" in problem.lower()


async def test_a_merchant_url_that_does_not_answer_in_time_is_a_problem(
    redis_url: str, tmp_path: Path
) -> None:
    import socket

    with socket.socket() as silent:  # accepts (the kernel does) and never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        url = f"http://127.0.0.1:{silent.getsockname()[1]}/webhooks"
        code, lines = await check(
            tmp_path,
            REDIS_URL=redis_url,
            DELIVERY_TIMEOUT_SECONDS="0.5",
            **{**WEBHOOK, "MERCHANT_WEBHOOK_URL": url},
        )
    assert code == 1
    [problem] = problems_of(lines)
    assert problem.startswith("MERCHANT_WEBHOOK_URL: ") and "0.5 s" in problem, problem


async def test_a_tls_error_with_the_merchant_is_a_problem(
    redis_url: str, tmp_path: Path, merchant: str
) -> None:
    url = merchant.replace("http://", "https://")  # a plain-HTTP server spoken to in TLS
    code, lines = await check(tmp_path, REDIS_URL=redis_url, **{**WEBHOOK, "MERCHANT_WEBHOOK_URL": url})
    assert code == 1
    [problem] = problems_of(lines)
    assert problem.startswith("MERCHANT_WEBHOOK_URL: cannot reach"), problem
    assert "ssl" in problem.lower(), problem


async def test_a_handler_that_cannot_be_imported_is_a_problem(redis_url: str, tmp_path: Path) -> None:
    code, lines = await check(tmp_path, REDIS_URL=redis_url, MERCHANT_HANDLER="no_such_module:deliver")
    assert code == 1
    assert problems_of(lines) == [
        "MERCHANT_HANDLER: cannot import no_such_module:deliver: ModuleNotFoundError: No module named 'no_such_module'"
    ]


async def test_a_handler_that_imports_passes(redis_url: str, tmp_path: Path) -> None:
    (tmp_path / "shop_hooks.py").write_text("def deliver(update):\n    pass\n")
    code, lines = await check(
        tmp_path, REDIS_URL=redis_url, MERCHANT_HANDLER="shop_hooks:deliver", PYTHONPATH=str(tmp_path)
    )
    assert code == 0, lines


async def test_a_wrong_redis_password_is_named(own_redis: RedisServer, tmp_path: Path) -> None:
    redis.Redis(port=own_redis.port).config_set("requirepass", "right-password")
    url = f"redis://:wrong-password@127.0.0.1:{own_redis.port}/0"
    code, lines = await check(tmp_path, REDIS_URL=url, **WEBHOOK)
    assert code == 1
    [problem] = problems_of(lines)
    assert problem.startswith(
        f"REDIS_URL: Redis at 127.0.0.1:{own_redis.port} db 0 refused the username or password"
    )
    assert "wrong-password" not in problem
    code, lines = await check(tmp_path, REDIS_URL=own_redis.url, **WEBHOOK)
    [problem] = problems_of(lines)
    assert "requires a password" in problem, problem


async def test_a_database_out_of_range_is_named(redis_url: str, tmp_path: Path) -> None:
    url = redis_url.rsplit("/", 1)[0] + "/99"
    code, lines = await check(tmp_path, REDIS_URL=url, **WEBHOOK)
    assert code == 1
    [problem] = problems_of(lines)
    assert "db 99 has no such database" in problem, problem


async def test_tls_against_a_plaintext_redis_is_named(redis_url: str, tmp_path: Path) -> None:
    url = redis_url.replace("redis://", "rediss://")
    code, lines = await check(tmp_path, REDIS_URL=url, **WEBHOOK)
    assert code == 1
    [problem] = problems_of(lines)
    assert problem.startswith("REDIS_URL: TLS with Redis at 127.0.0.1:"), problem


async def test_a_malformed_webhook_secret_is_one_line(redis_url: str, tmp_path: Path) -> None:
    code, lines = await check(
        tmp_path, REDIS_URL=redis_url, **{**WEBHOOK, "MERCHANT_WEBHOOK_SECRET": "whsec_not base64!"}
    )
    assert code == 1
    assert problems_of(lines) == [
        "MERCHANT_WEBHOOK_SECRET: must be a Standard Webhooks secret: whsec_ followed by base64"
    ]


@pytest.mark.parametrize(
    ("body", "content_type"),
    [
        ("<html>Bad Request</html>", "text/html"),
        # what the receiver would not take for an Error object either: a status that is a bool
        ('{"status": true, "type": "malformed content"}', "application/json"),
    ],
)
async def test_a_bare_400_from_the_verify_url_is_not_the_key_accepted(
    redis_url: str, tmp_path: Path, fake_intergiro: Any, body: str, content_type: str
) -> None:
    async def not_intergiro(request: web.Request) -> web.Response:
        return web.Response(status=400, text=body, content_type=content_type)

    fake_intergiro.state["verify_answer"] = not_intergiro
    remote = {"INTERGIRO_VERIFY": "remote", "INTERGIRO_API_URL": str(fake_intergiro.make_url("/"))}
    code, lines = await check(
        tmp_path, REDIS_URL=redis_url, INTERGIRO_API_KEY="test-api-key", **remote, **WEBHOOK
    )
    assert code == 1
    [problem] = problems_of(lines)
    assert (
        problem.startswith("INTERGIRO_API_URL: ")
        and "answered 400 without Intergiro's error object" in problem
    )


async def test_every_destinations_url_and_handler_is_tried_each_problem_naming_its_variable(
    redis_url: str, tmp_path: Path
) -> None:
    unreachable = f"http://127.0.0.1:{free_port()}/erp"
    destinations = {
        "DESTINATIONS": "erp,books,warehouse",
        "DESTINATION_ERP_URL": unreachable,
        "DESTINATION_ERP_SECRET": WEBHOOK["MERCHANT_WEBHOOK_SECRET"],
        "DESTINATION_BOOKS_HANDLER": "no_such_module_here:handle",
        "DESTINATION_WAREHOUSE_URL": WEBHOOK["MERCHANT_WEBHOOK_URL"],  # answers: no problem
        "DESTINATION_WAREHOUSE_SECRET": WEBHOOK["MERCHANT_WEBHOOK_SECRET"],
    }
    code, lines = await check(tmp_path, REDIS_URL=redis_url, **WEBHOOK, **destinations)
    assert code == 1
    erp, books = problems_of(lines)
    assert erp.startswith(f"DESTINATION_ERP_URL: cannot reach {unreachable}: "), erp
    assert books.startswith("DESTINATION_BOOKS_HANDLER: cannot import no_such_module_here:handle"), books

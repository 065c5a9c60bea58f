"""The stream destination (DESTINATION_<NAME>_STREAM): every update appended once, in its order's sequence,
through a worker's SIGKILL, filtered like any destination, and read by the consumer docs/update-v1.md
shows. Real Redis, real worker processes, real receiver."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from receiver.ops.app import create_ops_app
from receiver.settings import Settings
from tests.sink import wait_for
from tests.test_workers import EVENTS, post_order

ROOT = Path(__file__).resolve().parents[1]
STREAM = "igr-test:updates"
OPS_TOKEN = "ops-test-token-0123456789abcdefghijklmnop"


def feed_env(**more: str) -> dict[str, str]:
    return {"DESTINATIONS": "feed", "DESTINATION_FEED_STREAM": STREAM, **more}


async def feed_receiver(make_receiver: Any, env: dict[str, str]) -> Any:
    return await make_receiver(extra_destinations=Settings.from_env(env, dotenv=False).extra_destinations)


def read_all(sync_redis: Any) -> list[dict[str, Any]]:
    """Every entry of the stream, through a consumer group (as a consumer reads them), acknowledged."""
    try:
        sync_redis.xgroup_create(STREAM, "check", id="0")
    except Exception as exc:
        if "BUSYGROUP" not in str(exc):
            raise
    entries = []
    while got := sync_redis.xreadgroup("check", "checker", {STREAM: ">"}, count=1000):
        for _, batch in got:
            for entry_id, fields in batch:
                entries.append({k.decode(): v.decode() for k, v in fields.items()})
                sync_redis.xack(STREAM, "check", entry_id)
    return entries


async def test_every_update_is_appended_once_in_sequence_through_a_killed_worker(
    make_receiver: Any, rsa_key: Any, workers: Any, sync_redis: Any
) -> None:
    env = feed_env()
    receiver = await feed_receiver(make_receiver, env)
    orders = [f"Streamed{n:05d}" for n in range(300)]
    for order_id in orders:
        assert len(await post_order(receiver, rsa_key, order_id, EVENTS)) == 3
    settings = {k.lower(): v for k, v in env.items()}
    first = workers(**settings)
    await wait_for(lambda: sync_redis.xlen(STREAM) >= 150, what="the first appends")
    os.kill(first.pid, signal.SIGKILL)  # mid-run: deliveries in flight
    first.wait(5)
    workers(**settings)
    await wait_for(lambda: sync_redis.xlen(STREAM) >= 900, seconds=120, what="900 appends")
    await wait_for(lambda: not sync_redis.hlen("igr:updates"), seconds=60, what="every update finished")
    entries = read_all(sync_redis)
    assert len(entries) == 900
    assert len({e["id"] for e in entries}) == 900  # each once
    by_order: dict[str, list[int]] = {}
    for entry in entries:
        update = json.loads(entry["update"])
        assert (entry["id"], entry["order_id"], entry["event"], entry["status"]) == (
            update["id"], update["order_id"], update["event"]["type"], update["status"],
        )  # fmt: skip
        by_order.setdefault(entry["order_id"], []).append(update["event"]["sequence"])
    assert by_order == {order_id: [0, 1, 2] for order_id in orders}  # in each order's sequence


async def test_a_stream_destination_gets_only_what_its_filter_passes(
    make_receiver: Any, rsa_key: Any, workers: Any, sync_redis: Any
) -> None:
    env = feed_env(DESTINATION_FEED_EVENTS="charge")
    receiver = await feed_receiver(make_receiver, env)
    for n in range(5):
        await post_order(receiver, rsa_key, f"Filtered{n:05d}", EVENTS)
    workers(**{k.lower(): v for k, v in env.items()})
    await wait_for(lambda: sync_redis.xlen(STREAM) >= 5, what="five charges")
    await wait_for(lambda: not sync_redis.hlen("igr:updates"), what="every update finished")
    assert sorted(e["event"] for e in read_all(sync_redis)) == ["charge"] * 5


def test_a_stream_destination_with_a_url_too_stops_the_process_naming_the_variable() -> None:
    with pytest.raises(Exception, match="DESTINATION_FEED_STREAM"):
        Settings.from_env({**feed_env(), "DESTINATION_FEED_URL": "https://erp.example/hooks"}, dotenv=False)


def docs_python_consumer() -> str:
    text = (ROOT / "docs" / "update-v1.md").read_text()
    [code] = re.findall(r"```python\n(# stream-consumer\.py.*?)```", text, re.S)
    return code


async def test_the_docs_python_consumer_applies_and_acknowledges_every_entry(
    make_receiver: Any, rsa_key: Any, workers: Any, sync_redis: Any, redis_url: str, tmp_path: Path
) -> None:
    env = feed_env()
    receiver = await feed_receiver(make_receiver, env)
    ids = []
    for n in range(10):
        ids += await post_order(receiver, rsa_key, f"Consumed{n:05d}", EVENTS[:2])
    workers(**{k.lower(): v for k, v in env.items()})
    await wait_for(lambda: sync_redis.xlen(STREAM) >= 20, what="twenty appends")
    script = tmp_path / "stream-consumer.py"
    script.write_text(docs_python_consumer())
    out = tmp_path / "consumer.out"
    with out.open("wb") as sink:
        consumer = await asyncio.create_subprocess_exec(
            sys.executable, str(script), env={**os.environ, "REDIS_URL": redis_url, "STREAM": STREAM},
            stdout=sink, stderr=subprocess.STDOUT,
        )  # fmt: skip
        try:
            await wait_for(
                lambda: len(out.read_text().splitlines()) >= 20, what="the consumer's twenty lines"
            )
        finally:
            consumer.kill()
            await consumer.wait()
    applied = [json.loads(line)["id"] for line in out.read_text().splitlines()]
    assert sorted(applied) == sorted(ids)
    assert sync_redis.xpending(STREAM, "billing")["pending"] == 0  # every entry acknowledged


async def test_destination_list_and_the_console_api_show_a_stream_destinations_figures_like_the_others(
    make_receiver: Any, rsa_key: Any, workers: Any, sync_redis: Any, cli: Any, monkeypatch: Any,
    aiohttp_client: Any, settings: Settings,
) -> None:  # fmt: skip
    env = feed_env()
    receiver = await feed_receiver(make_receiver, env)
    for n in range(3):
        await post_order(receiver, rsa_key, f"Listed{n:05d}", EVENTS)  # three events each
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    ops_settings = settings.with_changes(
        extra_destinations=Settings.from_env(env, dotenv=False).extra_destinations, ops_token=OPS_TOKEN
    )
    ops = await aiohttp_client(create_ops_app(ops_settings, redis=sync_redis))

    async def rows() -> tuple[dict[str, Any], dict[str, Any]]:
        code, out = cli("destination", "list", "--json")
        assert code == 0
        [listed] = json.loads(out)
        [api] = await (
            await ops.get("/api/destinations", headers={"Authorization": f"Bearer {OPS_TOKEN}"})
        ).json()
        return listed, api

    listed, api = await rows()
    figures = ("destination", "state", "queued", "waiting", "in_flight", "retrying")
    assert [listed[f] for f in figures] == [
        "feed",
        "up",
        3,
        6,
        0,
        0,
    ]  # each order's head queued, two behind it
    assert listed["oldest_undelivered_seconds"] is not None
    assert [api[f] for f in figures] == [listed[f] for f in figures]
    code, out = cli("destination", "list")
    assert code == 0 and re.search(r"^feed\b.*\bup\b", out, re.M), out
    workers(**{k.lower(): v for k, v in env.items()})
    await wait_for(lambda: sync_redis.xlen(STREAM) == 9, what="nine appends")
    await wait_for(lambda: not sync_redis.hlen("igr:updates"), what="every update finished")
    listed, api = await rows()
    assert [listed[f] for f in figures] == [api[f] for f in figures] == ["feed", "up", 0, 0, 0, 0]
    assert listed["oldest_undelivered_seconds"] is None

"""`intergiro-receiver send` signs as Intergiro does, and every shipped sample is accepted by a receiver."""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jwt
import pytest
import redis
from cryptography.hazmat.primitives import serialization

from receiver.app import CALLBACK_PATH, create_app
from receiver.cli import build_parser
from receiver.settings import Settings
from receiver.tools.send import run_send, sample_names
from tests.conftest import queued_updates


@pytest.fixture
def key_file(tmp_path: Path, rsa_key: Any) -> Path:
    path = tmp_path / "signing-key.pem"
    path.write_bytes(
        rsa_key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    return path


@pytest.fixture
async def url(aiohttp_server: Any, make_settings: Callable[..., Settings]) -> str:
    """A real receiver for the development audience that trusts the test key."""
    server = await aiohttp_server(create_app(make_settings(intergiro_environment="development")))
    return str(server.make_url(CALLBACK_PATH))


async def send(*argv: str) -> int:
    args = build_parser().parse_args(["send", *argv])
    return await asyncio.to_thread(run_send, args)


def answers(out: str) -> list[tuple[int, dict[str, Any]]]:
    """The answers `send` printed (status and JSON body), among the receiver's own log lines."""
    lines = [line.split(" ", 1) for line in out.splitlines() if re.match(r"\d{3} [{]", line)]
    return [(int(status), json.loads(body)) for status, body in lines]


def statuses(client: redis.Redis, settings: Settings) -> list[tuple[str, str]]:
    return [(u["event"]["type"], u["status"]) for u in queued_updates(client, settings)]


def test_the_samples_shipped_are_the_card_story_a_failed_charge_and_a_defer_link() -> None:
    assert sample_names() == [
        "card-charge-failed",
        "card-charged",
        "card-ordered",
        "card-refunded",
        "defer-link",
    ]


@pytest.mark.parametrize("sample", sample_names())
async def test_every_shipped_sample_is_accepted_by_a_receiver(
    sample: str, url: str, key_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert await send(sample, "--url", url, "--key", str(key_file), "--audience", "development") == 0
    [(status, body)] = answers(capsys.readouterr().out)
    assert (status, body["status"]) == (200, "accepted")


async def test_the_card_samples_sent_in_turn_queue_ordered_charged_refunded_once_each(
    url: str, key_file: Path, sync_redis: redis.Redis, settings: Settings
) -> None:
    for sample in ("card-ordered", "card-charged", "card-refunded", "card-refunded"):
        assert await send(sample, "--url", url, "--key", str(key_file), "--audience", "development") == 0
    assert statuses(sync_redis, settings) == [
        ("order", "ordered"),
        ("charge", "charged"),
        ("refund", "refunded"),
    ]


async def test_the_failed_charge_sample_keeps_the_order_ordered_and_carries_the_error(
    url: str, key_file: Path, sync_redis: redis.Redis, settings: Settings
) -> None:
    assert (
        await send("card-charge-failed", "--url", url, "--key", str(key_file), "--audience", "development")
        == 0
    )
    fail = queued_updates(sync_redis, settings)[-1]
    assert (fail["event"]["type"], fail["event"]["original"], fail["status"]) == ("fail", "charge", "ordered")
    assert fail["event"]["error"]["type"] == "malformed content"


async def test_events_named_on_the_command_line_are_appended_and_queued(
    url: str, key_file: Path, sync_redis: redis.Redis, settings: Settings
) -> None:
    argv = ["card-ordered", "--event", "charge", "--event", "refund", "--url", url, "--key", str(key_file)]
    assert await send(*argv, "--audience", "development") == 0
    assert statuses(sync_redis, settings) == [
        ("order", "ordered"),
        ("charge", "charged"),
        ("refund", "refunded"),
    ]


async def test_an_order_file_is_sent_and_new_id_makes_a_fresh_order_instead_of_a_duplicate(
    url: str, key_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    order_file = tmp_path / "order.json"
    order_file.write_text((Path(__file__).parents[1] / "receiver/samples/defer-link.json").read_text())
    common = ["--url", url, "--key", str(key_file), "--audience", "development"]
    assert await send(str(order_file), *common) == 0
    assert await send(str(order_file), *common) == 0
    assert await send(str(order_file), "--new-id", *common) == 0
    printed = [body["status"] for _, body in answers(capsys.readouterr().out)]
    assert printed == ["accepted", "duplicate", "accepted"]


async def test_a_token_for_another_audience_is_refused_and_send_exits_1(
    url: str, key_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert await send("card-ordered", "--url", url, "--key", str(key_file), "--audience", "production") == 1
    assert [status for status, _ in answers(capsys.readouterr().out)] == [401]


def test_the_token_is_signed_as_intergiro_signs(
    key_file: Path, rsa_key: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    sent: list[str] = []
    monkeypatch.setattr(
        "receiver.tools.send.post_token", lambda url, token: (sent.append(token), (200, "{}"))[1]
    )
    args = build_parser().parse_args(["send", "card-ordered", "--url", "http://x/", "--key", str(key_file)])
    assert run_send(args) == 0
    header = jwt.get_unverified_header(sent[0])
    claims = jwt.decode(
        sent[0],
        rsa_key.public_key(),
        algorithms=["RS256"],
        audience="production",
        options={"verify_iat": False},
    )
    assert header == {"alg": "RS256", "typ": "JWT"}
    assert (claims["iss"], claims["id"], claims["currency"]) == ("payfunc", "SampleCard000001", "SEK")
    assert claims["iat"] > 10**12  # milliseconds, as real callbacks carry it


def test_an_unknown_sample_is_refused_naming_the_samples(capsys: pytest.CaptureFixture[str]) -> None:
    args = build_parser().parse_args(["send", "no-such-order", "--url", "http://x/"])
    assert run_send(args) == 2
    assert "card-ordered" in capsys.readouterr().err


def test_without_a_dev_key_send_says_how_to_make_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    args = build_parser().parse_args(["send", "card-ordered", "--url", "http://x/"])
    assert run_send(args) == 2
    assert "intergiro-receiver dev" in capsys.readouterr().err

"""The merchant POST itself, against real aiohttp servers: one kept-alive connection per worker, a
connection the merchant dropped while idle is opened again without costing an attempt, and every way a
POST can fail is a retryable DeliveryError, never an exception a worker does not expect."""

from __future__ import annotations

import asyncio
import ipaddress
import re
import ssl
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from standardwebhooks.webhooks import Webhook

from tests.processes import free_port
from tests.sink import SECRET, Sink, in_delivery_thread
from workers.delivery import DeliveryError, PermanentDeliveryError, TargetNotConfigured, WebhookTarget


def update(n: int) -> dict[str, Any]:
    return {"version": 1, "id": f"order{n}-0-order", "order_id": f"order{n}", "status": "ordered"}


async def start(aiohttp_server: Any, merchant: Sink, **server: Any) -> WebhookTarget:
    running = await aiohttp_server(merchant.app(), **server)
    return WebhookTarget(str(running.make_url("/hooks?shop=1")), SECRET, timeout_seconds=1.0)


async def test_deliveries_share_one_kept_alive_connection_and_are_signed(aiohttp_server: Any) -> None:
    merchant = Sink()
    target = await start(aiohttp_server, merchant)
    for n in range(5):
        await in_delivery_thread(target, update(n))
    assert len({r.port for r in merchant.received}) == 1
    for n, received in enumerate(merchant.received):
        assert Webhook(SECRET).verify(received.body, received.headers)["id"] == f"order{n}-0-order"
        assert received.headers["Idempotency-Key"] == f"order{n}-0-order"


async def test_a_connection_the_merchant_closed_while_idle_is_reopened_and_the_update_posted_once(
    aiohttp_server: Any,
) -> None:
    merchant = Sink()
    target = await start(aiohttp_server, merchant, keepalive_timeout=0.05)
    await in_delivery_thread(target, update(1))
    await asyncio.sleep(0.3)  # the merchant closes the idle connection; the worker has not noticed
    await in_delivery_thread(target, update(2))
    assert [r.headers["webhook-id"] for r in merchant.received] == ["order1-0-order", "order2-0-order"]
    assert merchant.received[0].port != merchant.received[1].port


@pytest.mark.parametrize(("answer_bytes", "connections"), [(60_000, 1), (2_000_000, 2)])
async def test_a_long_answer_is_not_read_in_full_and_the_next_post_goes_through(
    aiohttp_server: Any, answer_bytes: int, connections: int
) -> None:
    # Up to 64 KiB of the body is read and the connection kept; a longer one's connection is closed.
    merchant = Sink()
    merchant.answer_body = b"x" * answer_bytes
    target = await start(aiohttp_server, merchant)
    await in_delivery_thread(target, update(1))
    await in_delivery_thread(target, update(2))
    assert len(merchant.received) == 2
    assert len({r.port for r in merchant.received}) == connections


@pytest.mark.parametrize(("status", "retryable"), [(503, True), (429, True), (408, True), (404, False)])
async def test_an_error_answer_is_a_delivery_error_with_the_merchants_retry_after(
    aiohttp_server: Any, status: int, retryable: bool
) -> None:
    merchant = Sink()
    merchant.answer = lambda _id, _n: (status, {"Retry-After": "7"}, 0.0)
    target = await start(aiohttp_server, merchant)
    with pytest.raises(DeliveryError) as raised:
        await in_delivery_thread(target, update(1))
    assert raised.value.retryable is retryable
    assert isinstance(raised.value, PermanentDeliveryError) is not retryable
    assert f"HTTP {status}" in str(raised.value)
    if retryable:
        assert raised.value.retry_after == 7.0
    merchant.answer = lambda _id, _n: (200, {}, 0.0)
    await in_delivery_thread(target, update(2))  # the connection is still good for the next update


async def test_a_merchant_slower_than_the_timeout_is_a_retryable_failure(aiohttp_server: Any) -> None:
    merchant = Sink()
    merchant.answer = lambda _id, _n: (200, {}, 3.0)
    target = await start(aiohttp_server, merchant)
    with pytest.raises(DeliveryError, match="TimeoutError") as raised:
        await in_delivery_thread(target, update(1))
    assert raised.value.retryable
    assert len(merchant.received) == 1  # a timed-out POST is not sent again within the attempt


async def test_a_merchant_not_listening_is_a_retryable_failure() -> None:
    target = WebhookTarget(f"http://127.0.0.1:{free_port()}/hooks", SECRET, timeout_seconds=1.0)
    with pytest.raises(DeliveryError, match="ConnectionRefusedError") as raised:
        await in_delivery_thread(target, update(1))
    assert raised.value.retryable


class CannedMerchant:
    """A raw HTTP/1.1 server: reads each request whole and answers it with the next canned bytes (a
    list: pieces sent 50 ms apart), closing the connection after it when told; for answers aiohttp
    would not give."""

    def __init__(self, *answers: tuple[bytes | list[bytes], bool]) -> None:
        self.answers = list(answers)
        self.requests: list[bytes] = []
        self.connections = 0

    async def start(self) -> str:
        server = await asyncio.start_server(self.serve, "127.0.0.1", 0)
        self.server = server
        return f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}/hooks"

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            while self.answers:
                head = await reader.readuntil(b"\r\n\r\n")
                length = int(re.search(rb"Content-Length: (\d+)", head).group(1))  # type: ignore[union-attr]
                self.requests.append(head + await reader.readexactly(length))
                answer, close = self.answers.pop(0)
                for n, piece in enumerate([answer] if isinstance(answer, bytes) else answer):
                    if n:
                        await asyncio.sleep(0.05)
                    writer.write(piece)
                    await writer.drain()
                if close:
                    break
        except asyncio.IncompleteReadError:
            pass
        writer.close()


OK_EMPTY = b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"


@pytest.mark.parametrize(
    ("answer", "what"),
    [
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n4\r\nok!!\r\n0\r\n\r\n", "chunked"),
        ([b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n12345", b"67890"], "a body in two pieces"),
        (b"HTTP/1.1 204 No Content\r\n\r\n", "no body"),
    ],
)
async def test_a_kept_alive_answer_is_read_whole_and_the_connection_reused(
    answer: bytes | list[bytes], what: str
) -> None:
    merchant = CannedMerchant((answer, False), (OK_EMPTY, False))
    target = WebhookTarget(await merchant.start(), SECRET, timeout_seconds=1.0)
    await in_delivery_thread(target, update(1))
    await in_delivery_thread(target, update(2))
    assert (len(merchant.requests), merchant.connections) == (2, 1), what


async def test_an_informational_answer_before_the_final_one_is_retried_on_a_new_connection() -> None:
    # http.client (under urllib3) passes over 100 Continue only; the final answer behind a 103 is never
    # read, so the connection is not used again.
    early_hints = [b"HTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\n", OK_EMPTY]
    merchant = CannedMerchant((early_hints, False), (OK_EMPTY, False))
    target = WebhookTarget(await merchant.start(), SECRET, timeout_seconds=1.0)
    with pytest.raises(DeliveryError, match="informational answer") as raised:
        await in_delivery_thread(target, update(1))
    assert raised.value.retryable
    await in_delivery_thread(target, update(2))
    assert (len(merchant.requests), merchant.connections) == (2, 2)


@pytest.mark.parametrize(
    "answer",
    [
        b"HTTP/1.0 200 OK\r\n\r\nframed by the close",
        b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 0\r\n\r\n",
    ],
)
async def test_an_answer_that_ends_the_connection_is_taken_and_the_next_post_opens_another(
    answer: bytes,
) -> None:
    merchant = CannedMerchant((answer, True), (OK_EMPTY, False))
    target = WebhookTarget(await merchant.start(), SECRET, timeout_seconds=1.0)
    await in_delivery_thread(target, update(1))
    await in_delivery_thread(target, update(2))
    assert (len(merchant.requests), merchant.connections) == (2, 2)


@pytest.mark.parametrize(
    ("answer", "error"),
    [
        (b"SPDY/9 what\r\n\r\n", "AnswerError: unreadable answer"),
        (b"HTTP/1.1 2", "AnswerError: unreadable answer"),
        (b"", "AnswerError: connection closed before any answer"),
        (
            b"HTTP/1.1 200 OK\r\n" + b"X-Endless: header\r\n" * 5000,
            "AnswerError: unreadable answer.*100 headers",
        ),
        (
            b"HTTP/1.1 200 OK\r\n" + b"X-Long: %s\r\n" % (b"h" * 2000) * 40,
            "AnswerError: no status line and headers",
        ),
    ],
)
async def test_an_unreadable_or_missing_answer_is_a_retryable_failure_and_not_sent_again(
    answer: bytes, error: str
) -> None:
    merchant = CannedMerchant((answer, True))
    target = WebhookTarget(await merchant.start(), SECRET, timeout_seconds=1.0)
    with pytest.raises(DeliveryError, match=error) as raised:
        await in_delivery_thread(target, update(1))
    assert raised.value.retryable
    assert len(merchant.requests) == 1


def self_signed_certificate(directory: Path) -> tuple[Path, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "merchant.test")])
    now = datetime.now(UTC)
    certificate = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number()).not_valid_before(now - timedelta(hours=1))
        .not_valid_after(now + timedelta(hours=1))
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), True)
        .sign(key, hashes.SHA256())
    )  # fmt: skip
    cert_path, key_path = directory / "merchant.pem", directory / "merchant.key"
    cert_path.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    return cert_path, key_path


async def test_an_https_merchant_is_posted_to_when_its_certificate_is_trusted_and_refused_otherwise(
    aiohttp_server: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cert_path, key_path = self_signed_certificate(tmp_path)
    tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    tls.load_cert_chain(cert_path, key_path)
    merchant = Sink()
    running = await aiohttp_server(merchant.app(), ssl=tls)
    url = str(running.make_url("/hooks")).replace("http://", "https://")

    untrusting = WebhookTarget(url, SECRET, timeout_seconds=1.0)
    with pytest.raises(DeliveryError, match="SSLCertVerificationError") as raised:
        await in_delivery_thread(untrusting, update(1))
    assert raised.value.retryable and merchant.received == []

    monkeypatch.setenv("SSL_CERT_FILE", str(cert_path))  # the default context trusts it from now on
    trusting = WebhookTarget(url, SECRET, timeout_seconds=1.0)
    for n in (2, 3):
        await in_delivery_thread(trusting, update(n))
    assert len(merchant.received) == 2 and len({r.port for r in merchant.received}) == 1


async def test_a_path_outside_ascii_is_sent_percent_encoded() -> None:
    merchant = CannedMerchant((OK_EMPTY, False))
    target = WebhookTarget((await merchant.start()).replace("/hooks", "/hoøks"), SECRET, timeout_seconds=1.0)
    await in_delivery_thread(target, update(1))
    assert merchant.requests[0].startswith(b"POST /ho%C3%B8ks HTTP/1.1\r\n")


def test_a_webhook_url_that_is_not_http_stops_the_worker_at_start() -> None:
    with pytest.raises(TargetNotConfigured, match="MERCHANT_WEBHOOK_URL: not an http"):
        WebhookTarget("ftp://merchant.test/hooks", SECRET, timeout_seconds=1.0)

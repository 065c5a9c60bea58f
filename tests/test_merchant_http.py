"""How the merchant is reached, against real servers: through HTTP_PROXY / HTTPS_PROXY unless NO_PROXY
names it, with a client certificate when the merchant asks for one, with the URL's credentials as Basic
auth (and nowhere in a log or a dead letter), at an IPv6 address, and never along a redirect."""

from __future__ import annotations

import asyncio
import base64
import os
import socket
import ssl
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import orjson
import pytest

from receiver.app import CALLBACK_PATH
from receiver.rediskeys import RedisKeys
from receiver.settings import Settings
from tests.certificates import TestCA
from tests.helpers import JWT, card_order, token
from tests.processes import free_port
from tests.sink import SECRET, Sink, in_delivery_thread, wait_for
from workers.delivery import DeliveryError, PermanentDeliveryError, WebhookTarget, build_targets
from workers.merchant_http import bypasses_proxy


def update(n: int) -> dict[str, Any]:
    return {"version": 1, "id": f"order{n}-0-order", "order_id": f"order{n}", "status": "ordered"}


def webhook_target(**env: str) -> WebhookTarget:
    """The target a worker builds from these settings (and the webhook secret)."""
    settings = Settings.from_env({"MERCHANT_WEBHOOK_SECRET": SECRET, **env}, dotenv=False)
    [target] = build_targets(settings)
    assert isinstance(target, WebhookTarget)
    return target


async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    except ConnectionError:
        pass
    finally:
        writer.close()


class ForwardProxy:
    """A real forward proxy on 127.0.0.1: an absolute-form request (for an http:// URL) is forwarded on
    a connection of its own and its answer relayed, closing the client's connection after it; CONNECT
    (for https://) opens a tunnel. It counts what it carried and keeps each Proxy-Authorization."""

    def __init__(self) -> None:
        self.forwarded = 0
        self.tunnels = 0
        self.authorizations: list[str] = []
        self.writers: list[asyncio.StreamWriter] = []

    async def start(self) -> str:
        self.server = await asyncio.start_server(self.serve, "127.0.0.1", 0)
        return f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"

    def close(self) -> None:
        self.server.close()
        for writer in self.writers:
            writer.close()

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.writers.append(writer)
        try:
            head = await reader.readuntil(b"\r\n\r\n")
        except (asyncio.IncompleteReadError, ConnectionError):
            writer.close()
            return
        request_line, *lines = [line for line in head.decode("latin-1").split("\r\n") if line]
        method, target, version = request_line.split(" ")
        headers = {name.lower(): value for name, _, value in (line.partition(": ") for line in lines)}
        self.authorizations.append(headers.get("proxy-authorization", ""))
        if method == "CONNECT":
            host, _, port = target.rpartition(":")
            up_reader, up_writer = await asyncio.open_connection(host.strip("[]"), int(port))
            self.writers.append(up_writer)
            self.tunnels += 1
            writer.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
            await writer.drain()
            await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))
            return
        url = urlsplit(target)
        assert url.scheme == "http" and url.hostname, f"not an absolute-form request: {request_line}"
        body = await reader.readexactly(int(headers.get("content-length", "0")))
        up_reader, up_writer = await asyncio.open_connection(url.hostname, url.port or 80)
        self.forwarded += 1
        kept = "".join(
            f"{line}\r\n" for line in lines if not line.lower().startswith(("proxy-", "connection:"))
        )
        path = (url.path or "/") + (f"?{url.query}" if url.query else "")
        up_writer.write(f"{method} {path} {version}\r\n{kept}Connection: close\r\n\r\n".encode() + body)
        await up_writer.drain()
        writer.write(await up_reader.read())  # the merchant closes after its answer
        up_writer.close()
        await writer.drain()
        writer.close()


@pytest.fixture
async def proxy() -> Any:
    running = ForwardProxy()
    running.url = await running.start()  # type: ignore[attr-defined]
    yield running
    running.close()


async def test_an_http_merchant_is_posted_to_through_http_proxy_with_the_proxys_credentials(
    aiohttp_server: Any, proxy: Any
) -> None:
    merchant = Sink()
    url = str((await aiohttp_server(merchant.app())).make_url("/hooks?shop=1"))
    proxy_url = proxy.url.replace("http://", "http://relay:pa%20ss@")
    target = webhook_target(MERCHANT_WEBHOOK_URL=url, HTTP_PROXY=proxy_url, HTTPS_PROXY=proxy.url)
    for n in (1, 2):
        await in_delivery_thread(target, update(n))
    assert [r.headers["webhook-id"] for r in merchant.received] == ["order1-0-order", "order2-0-order"]
    assert proxy.forwarded == 2 and proxy.tunnels == 0
    assert proxy.authorizations == ["Basic " + base64.b64encode(b"relay:pa ss").decode()] * 2


async def test_an_https_merchant_is_posted_to_through_a_connect_tunnel_of_https_proxy(
    aiohttp_server: Any, proxy: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ca = TestCA(tmp_path)
    server_cert = ca.issue("merchant", hosts=("127.0.0.1",))
    tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    tls.load_cert_chain(server_cert.cert, server_cert.key)
    merchant = Sink()
    running = await aiohttp_server(merchant.app(), ssl=tls)
    url = str(running.make_url("/hooks")).replace("http://", "https://")
    monkeypatch.setenv("SSL_CERT_FILE", str(ca.cert))
    target = webhook_target(MERCHANT_WEBHOOK_URL=url, HTTPS_PROXY=proxy.url, NO_PROXY="merchant.test")
    for n in (1, 2, 3):
        await in_delivery_thread(target, update(n))
    assert len(merchant.received) == 3
    assert (proxy.tunnels, proxy.forwarded) == (1, 0)  # the tunnel is the kept-alive connection

    direct = webhook_target(MERCHANT_WEBHOOK_URL=url, HTTP_PROXY=proxy.url)  # HTTP_PROXY: http:// only
    await in_delivery_thread(direct, update(4))
    assert len(merchant.received) == 4 and proxy.tunnels == 1


@pytest.mark.parametrize("no_proxy", ["127.0.0.1", "localhost,127.0.0.0/8", "*", ".example.test, 127.0.0.1"])
async def test_no_proxy_naming_the_merchant_sends_the_post_directly(
    aiohttp_server: Any, proxy: Any, no_proxy: str
) -> None:
    merchant = Sink()
    url = str((await aiohttp_server(merchant.app())).make_url("/hooks"))
    target = webhook_target(
        MERCHANT_WEBHOOK_URL=url, HTTP_PROXY=proxy.url, HTTPS_PROXY=proxy.url, NO_PROXY=no_proxy
    )
    await in_delivery_thread(target, update(1))
    assert len(merchant.received) == 1
    assert (proxy.forwarded, proxy.tunnels, proxy.authorizations) == (0, 0, [])


async def test_the_lower_case_proxy_variables_count_when_the_upper_case_ones_are_unset(
    aiohttp_server: Any, proxy: Any
) -> None:
    merchant = Sink()
    url = str((await aiohttp_server(merchant.app())).make_url("/hooks"))
    await in_delivery_thread(webhook_target(MERCHANT_WEBHOOK_URL=url, http_proxy=proxy.url), update(1))
    assert proxy.forwarded == 1
    await in_delivery_thread(
        webhook_target(MERCHANT_WEBHOOK_URL=url, http_proxy=proxy.url, no_proxy="127.0.0.1"), update(2)
    )
    assert proxy.forwarded == 1 and len(merchant.received) == 2


async def test_a_proxy_that_is_not_listening_is_a_retryable_failure_naming_the_proxy(
    aiohttp_server: Any,
) -> None:
    merchant = Sink()
    url = str((await aiohttp_server(merchant.app())).make_url("/hooks"))
    target = webhook_target(
        MERCHANT_WEBHOOK_URL=url, HTTP_PROXY=f"http://relay:hunter2@127.0.0.1:{free_port()}"
    )
    with pytest.raises(DeliveryError, match="proxy") as raised:
        await in_delivery_thread(target, update(1))
    assert raised.value.retryable and "hunter2" not in str(raised.value)
    assert merchant.received == []


@pytest.mark.parametrize(
    ("no_proxy", "host", "port", "bypassed"),
    [("*", "merchant.test", 443, True), ("merchant.test", "merchant.test", 443, True),
     ("merchant.test", "hooks.merchant.test", 443, True), (".merchant.test", "hooks.merchant.test", 443, True),
     ("*.merchant.test", "hooks.merchant.test", 443, True), ("merchant.test", "evilmerchant.test", 443, False),
     ("merchant.test:8443", "merchant.test", 443, False), ("merchant.test:8443", "merchant.test", 8443, True),
     ("MERCHANT.test", "merchant.TEST", 80, True), ("127.0.0.1", "127.0.0.1", 80, True),
     ("10.0.0.0/8", "10.1.2.3", 80, True), ("10.0.0.0/8", "11.1.2.3", 80, False),
     ("::1", "[::1]", 80, True), ("[::1]:8080", "::1", 8080, True), ("fd00::/8", "fd12::1", 80, True),
     ("localhost, 127.0.0.1", "merchant.test", 80, False), ("", "merchant.test", 80, False),
     ("localhost, *", "merchant.test", 80, True), ("merchant.test", "10.1.2.3", 80, False),
     ("10.0.0.0/8", "10.merchant.test", 80, False), ("127.0.0.1:8080", "127.0.0.1", 80, False)],
)  # fmt: skip
def test_no_proxy_matches_hosts_domains_addresses_blocks_and_ports(
    no_proxy: str, host: str, port: int, bypassed: bool
) -> None:
    assert bypasses_proxy(no_proxy, host, port) is bypassed


async def test_credentials_in_the_url_are_sent_as_basic_auth(aiohttp_server: Any) -> None:
    merchant = Sink()
    url = str((await aiohttp_server(merchant.app())).make_url("/hooks"))
    target = webhook_target(MERCHANT_WEBHOOK_URL=url.replace("http://", "http://shop%2B1:s3cr%40t@"))
    await in_delivery_thread(target, update(1))
    [received] = merchant.received
    assert received.headers["Authorization"] == "Basic " + base64.b64encode(b"shop+1:s3cr@t").decode()
    with_credentials = {
        "MERCHANT_WEBHOOK_URL": url.replace("//", "//a:s3cr@"),
        "MERCHANT_WEBHOOK_SECRET": SECRET,
    }
    assert "s3cr" not in repr(Settings.from_env(with_credentials))


async def test_an_ipv6_merchant_gets_a_bracketed_host_header(aiohttp_server: Any) -> None:
    try:
        with socket.socket(socket.AF_INET6) as probe:
            probe.bind(("::1", 0))
    except OSError as exc:
        print(f"skipped: ::1 cannot be bound here ({exc})")
        pytest.skip(f"::1 cannot be bound here ({exc})")
    merchant = Sink()
    running = await aiohttp_server(merchant.app(), host="::1")
    url = f"http://[::1]:{running.port}/hooks"
    target = webhook_target(MERCHANT_WEBHOOK_URL=url, HTTP_PROXY="http://127.0.0.1:9", NO_PROXY="::1")
    for n in (1, 2):
        await in_delivery_thread(target, update(n))
    assert [r.headers["Host"] for r in merchant.received] == [f"[::1]:{running.port}"] * 2
    assert len({r.port for r in merchant.received}) == 1


async def test_a_redirect_is_an_answer_not_followed(aiohttp_server: Any) -> None:
    merchant = Sink()
    merchant.answer = lambda _id, _n: (302, {"Location": "/hooks"}, 0.0)
    url = str((await aiohttp_server(merchant.app())).make_url("/hooks"))
    with pytest.raises(PermanentDeliveryError, match="HTTP 302"):
        await in_delivery_thread(webhook_target(MERCHANT_WEBHOOK_URL=url), update(1))
    assert len(merchant.received) == 1


async def test_a_forked_worker_opens_its_own_connection_and_leaves_its_parents_alone(
    aiohttp_server: Any,
) -> None:
    merchant = Sink()
    url = str((await aiohttp_server(merchant.app())).make_url("/hooks"))
    target = webhook_target(MERCHANT_WEBHOOK_URL=url)
    await in_delivery_thread(target, update(1))
    pid = os.fork()
    if pid == 0:  # the child: one POST on a connection of its own, then out without any cleanup
        code = 1
        try:
            target(update(2))
            code = 0
        finally:
            os._exit(code)
    _, status = await asyncio.to_thread(os.waitpid, pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    await in_delivery_thread(target, update(3))
    parent_first, child, parent_again = (r.port for r in merchant.received)
    assert parent_first == parent_again != child


# Real worker processes against a merchant that requires a client certificate.


@pytest.fixture
async def mutual_tls_merchant(aiohttp_server: Any, tmp_path: Path) -> tuple[Sink, str, TestCA]:
    """A merchant on https://127.0.0.1 that accepts only clients with a certificate its CA signed."""
    ca = TestCA(tmp_path)
    server_cert = ca.issue("merchant", hosts=("127.0.0.1",))
    tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=str(ca.cert))
    tls.verify_mode = ssl.CERT_REQUIRED
    tls.load_cert_chain(server_cert.cert, server_cert.key)
    merchant = Sink()
    running = await aiohttp_server(merchant.app(), ssl=tls)
    return merchant, str(running.make_url("/hooks")).replace("http://", "https://"), ca


async def post_order(receiver: Any, key: Any, order_id: str) -> str:
    response = await receiver.post(
        CALLBACK_PATH, data=token(card_order(order_id, ("order",)), key), headers=JWT
    )
    assert response.status == 200, await response.text()
    [update_id] = (await response.json())["queued"]
    return str(update_id)


async def test_a_merchant_requiring_a_client_certificate_gets_the_post_from_a_worker_that_has_one(
    receiver: Any, rsa_key: Any, workers: Any, mutual_tls_merchant: Any
) -> None:
    merchant, url, ca = mutual_tls_merchant
    client = ca.issue("worker", client=True)
    update_id = await post_order(receiver, rsa_key, "MutualTlsOrder01")
    workers(
        merchant_webhook_url=url,
        merchant_webhook_secret=SECRET,
        merchant_tls_client_cert=client.cert,
        merchant_tls_client_key=client.key,
        ssl_cert_file=ca.cert,
    )
    await wait_for(lambda: len(merchant.received) == 1, what="the delivery")
    assert merchant.received[0].headers["webhook-id"] == update_id


async def test_without_a_client_certificate_the_post_is_retried_then_dead_lettered(
    receiver: Any, rsa_key: Any, workers: Any, mutual_tls_merchant: Any, sync_redis: Any, tmp_path: Path
) -> None:
    merchant, url, ca = mutual_tls_merchant
    update_id = await post_order(receiver, rsa_key, "MutualTlsOrder02")
    workers(
        merchant_webhook_url=url.replace("https://", "https://shop:pa55w0rd-xyz@"),
        merchant_webhook_secret=SECRET,
        delivery_max_attempts=2,
        delivery_backoff_seconds=0.01,
        ssl_cert_file=ca.cert,
    )
    dead_letters = RedisKeys().dead_letters
    await wait_for(lambda: sync_redis.hexists(dead_letters, update_id), what="the dead letter")
    entry = orjson.loads(sync_redis.hget(dead_letters, update_id))
    assert entry["attempts"] == 2 and entry["last_error"].startswith("POST failed"), entry
    assert merchant.received == []
    log = (tmp_path / "worker.log").read_text()
    assert "delivery retry scheduled" in log
    assert "pa55w0rd-xyz" not in log + entry["last_error"]

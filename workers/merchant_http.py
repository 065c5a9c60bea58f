"""The merchant POST over urllib3: one kept-alive connection to the merchant's webhook URL per worker
thread, each of which POSTs one update at a time.

urllib3 gives what a webhook client needs through its public API: a proxy (`ProxyManager`: an
`http://` URL is forwarded, an `https://` one tunnelled with CONNECT), a client certificate (the
TLS context), streamed answers read only up to a bound, no redirects and no retries of its own. It
is one package with no dependencies of its own, and costs less CPU per POST than httpx's sync client
(docs/performance.md).

What urllib3 leaves to us: the proxy variables are read by `receiver.settings` (so `.env` counts
too) and NO_PROXY is matched here (the standard library's rules, with addresses and CIDR blocks
added); credentials written in the URL become Basic auth and are kept out of every message; the pool
is made per process, on first use, so a forked worker never shares its parent's socket.
"""

from __future__ import annotations

import ipaddress
import os
import ssl
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from http.client import HTTPException, RemoteDisconnected
from typing import Any
from urllib.parse import unquote, urlsplit
from urllib.request import proxy_bypass_environment  # type: ignore[attr-defined]  # not in typeshed

import urllib3
from urllib3.exceptions import HTTPError, ProtocolError, ProxyError
from urllib3.exceptions import TimeoutError as Urllib3Timeout

from receiver.destinations import Destination
from receiver.errors import IntergiroReceiverError
from receiver.handler_errors import DeliveryError

# A longer answer head is refused; of a longer body this much is read, then the connection is closed.
MAX_ANSWER_BYTES = 65536
READ_BYTES = 65536
# What an attempt's history keeps of the merchant's answer body.
BODY_KEPT_BYTES = 1024


@dataclass(frozen=True)
class Answer:
    """The merchant's answer: its status, Retry-After and Content-Type (as sent), and the first
    BODY_KEPT_BYTES of its body with any credential of ours (the URL's or a proxy's) replaced by ***."""

    status: int
    retry_after: str | None = None
    content_type: str | None = None
    body_start: bytes = b""


class AnswerError(IntergiroReceiverError):
    """The merchant's answer could not be read: malformed, or cut short before its status line ended."""


class PostFailed(DeliveryError):
    """No answer to the POST (or HEAD) that could be read: refused, timed out, reset, TLS, a proxy, or an
    unreadable answer. urllib3's errors and http.client's become this one, here and nowhere else: a
    retryable attempt that says the merchant is unreachable."""

    def __init__(self, cause: OSError | AnswerError) -> None:
        super().__init__(f"POST failed: {type(cause).__name__}: {cause}", unreachable=True)
        self.detail = str(cause)
        self.answered = isinstance(cause, AnswerError)  # something answered, if not in readable HTTP
        self.timed_out = isinstance(cause, TimeoutError)


@dataclass(frozen=True)
class ConnectionOptions:
    """How the merchant is reached beyond its URL: proxies (HTTP_PROXY, HTTPS_PROXY, NO_PROXY) and the
    client certificate for mutual TLS (MERCHANT_TLS_CLIENT_CERT, MERCHANT_TLS_CLIENT_KEY)."""

    http_proxy: str = ""
    https_proxy: str = ""
    no_proxy: str = ""
    client_cert: str = ""
    client_key: str = ""

    @classmethod
    def of(cls, destination: Destination) -> ConnectionOptions:
        """The destination's (its own variables, or the global proxies and MERCHANT_TLS_CLIENT_*)."""
        d = destination
        return cls(d.http_proxy, d.https_proxy, d.no_proxy, d.tls_client_cert, d.tls_client_key)

    def proxy_for(self, scheme: str, host: str, port: int) -> str:
        """The proxy URL for a request to scheme://host:port, or "" to connect directly."""
        proxy = self.https_proxy if scheme == "https" else self.http_proxy
        if not proxy or bypasses_proxy(self.no_proxy, host, port):
            return ""
        return proxy


def bypasses_proxy(no_proxy: str, host: str, port: int) -> bool:
    """Whether NO_PROXY (comma-separated: `*`, host names matching themselves and their subdomains,
    with or without a leading dot or `*.`, IP addresses, CIDR blocks, each optionally with `:port`)
    names `host`. Host names follow the standard library's rules (`proxy_bypass_environment`, as
    urllib and requests apply them); what those lack is added here: `*` among other entries, `*.`,
    and addresses matched as addresses (IPv6 in brackets when a port follows, CIDR blocks)."""
    host = host.strip("[]").lower()
    try:
        address: ipaddress.IPv4Address | ipaddress.IPv6Address | None = ipaddress.ip_address(host)
    except ValueError:
        address = None
    names = []
    for entry in (e.strip().lower() for e in no_proxy.split(",")):
        if entry == "*":
            return True
        if not entry:
            continue
        if address is None:
            names.append(entry.removeprefix("*."))
        elif _names_address(entry, address, port):
            return True
    return address is None and proxy_bypass_environment(f"{host}:{port}", {"no": ",".join(names)})


def _names_address(entry: str, address: ipaddress.IPv4Address | ipaddress.IPv6Address, port: int) -> bool:
    """Whether a NO_PROXY entry (an address or a CIDR block, optionally with `:port`) holds `address`."""
    name, entry_port = entry, ""
    if entry.startswith("["):  # [::1]:8080
        name, _, rest = entry[1:].partition("]")
        entry_port = rest.removeprefix(":")
    elif entry.count(":") == 1:  # 10.0.0.1:8080 (an IPv6 address without brackets has several colons)
        name, entry_port = entry.split(":")
    if entry_port and entry_port != str(port):
        return False
    try:
        return address in ipaddress.ip_network(name, strict=False)
    except ValueError:  # a host name: not an address's
        return False


def redact_url(url: str) -> str:
    """`url` without the password written in it (`https://user:***@host/path`)."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.rpartition("@")[2]
    return parts._replace(netloc=f"{parts.username}:***@{netloc}").geturl()


def _without_credentials(url: str) -> tuple[str, dict[str, str]]:
    """`url` without its user and password, and the Basic auth header they make (if any)."""
    parts = urlsplit(url)
    if "@" not in parts.netloc:
        return url, {}
    user, password = unquote(parts.username or ""), unquote(parts.password or "")
    netloc = parts.netloc.rpartition("@")[2]
    return parts._replace(netloc=netloc).geturl(), urllib3.make_headers(basic_auth=f"{user}:{password}")


def _no_password_prompt() -> bytes:
    # A key that needs a password must fail, not make OpenSSL ask for one on the worker's terminal.
    return b""


def tls_context(options: ConnectionOptions) -> ssl.SSLContext:
    """The system's trust store (SSL_CERT_FILE / SSL_CERT_DIR add CAs, read by OpenSSL as today) and
    the client certificate, if any."""
    context = ssl.create_default_context()
    if options.client_cert:
        context.load_cert_chain(options.client_cert, options.client_key or None, _no_password_prompt)
    return context


class MerchantConnection:
    """POSTs to one URL over a kept-alive connection (through a proxy when one applies), opened when
    needed, in each process that posts."""

    def __init__(self, url: str, timeout_seconds: float, options: ConnectionOptions | None = None) -> None:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"not an http(s) URL: {redact_url(url)!r}")
        try:
            port = parts.port or (443 if parts.scheme == "https" else 80)
        except ValueError:
            raise ValueError(f"bad port in {redact_url(url)!r}") from None
        self.url, self.auth_headers = _without_credentials(url)
        self.path = urllib3.util.parse_url(self.url).request_uri
        self.host, self.port = parts.hostname, port  # what a trace may name of the merchant
        self.redacted_url = redact_url(url)
        self.secrets = [s for s in (parts.password, unquote(parts.password or "")) if s]
        self.options = options or ConnectionOptions()
        self.proxy = self.options.proxy_for(parts.scheme, parts.hostname, port)
        if self.proxy:
            proxy_parts = urlsplit(self.proxy)
            if proxy_parts.password:
                self.secrets += [proxy_parts.password, unquote(proxy_parts.password)]
        self.timeout = urllib3.Timeout(connect=timeout_seconds, read=timeout_seconds)
        # Each thread that posts (a worker keeps several deliveries in flight) has its own connection.
        self._local = _ThreadConnection()
        self._tls: tuple[int, ssl.SSLContext] | None = None  # (pid, context)
        self._tls_lock = threading.Lock()

    def post(self, body: bytes, headers: Mapping[str, str]) -> Answer:
        """POST `body`; returns the merchant's answer. Raises PostFailed (refused, timed out, reset,
        TLS, proxy, an unreadable answer), after closing the connection. A kept-alive connection the
        merchant closed as the POST left fails before any answer: the POST is sent again, once, on a
        new connection."""
        all_headers = {**self.auth_headers, **headers} if self.auth_headers else dict(headers)
        reused, self._local.reusable = self._local.reusable, False
        try:
            try:
                return self._exchange(body, all_headers)
            except (RemoteDisconnected, ConnectionResetError, BrokenPipeError):
                if not reused:
                    raise
                self.close()
                return self._exchange(body, all_headers)
        except RemoteDisconnected:
            self.close()
            raise PostFailed(AnswerError("connection closed before any answer")) from None
        except (OSError, AnswerError) as exc:
            self.close()
            raise PostFailed(self._redacted(exc)) from None
        except BaseException:
            self.close()
            raise

    def reach(self) -> int:
        """`HEAD` the URL (for `check`): the status of any answer; raises PostFailed as `post` does.
        Nothing is posted."""
        try:
            answer = self._manager().urlopen(
                "HEAD", self.url, headers=dict(self.auth_headers), redirect=False, preload_content=False
            )
        except HTTPError as exc:
            raise PostFailed(self._redacted(_unwrapped(exc))) from None
        except HTTPException as exc:
            raise PostFailed(AnswerError(f"unreadable answer: {type(exc).__name__}: {exc}")) from None
        finally:
            self.close()
        return int(answer.status)

    def close(self) -> None:
        """Close this thread's connection."""
        self._local.reusable = False
        self._local.host_pool = None  # closed with the manager's pools
        if self._local.pool is not None:
            self._local.pool.clear()

    def _tls_context(self) -> ssl.SSLContext:
        """The TLS context every thread's pool shares (reading the trust store costs CPU: once per
        process, not once per delivery thread), made anew in a forked child."""
        with self._tls_lock:
            if self._tls is None or self._tls[0] != os.getpid():
                self._tls = (os.getpid(), tls_context(self.options))
            return self._tls[1]

    def _manager(self) -> urllib3.PoolManager:
        """This thread's pool: made on first use, and made anew in a forked child."""
        local = self._local
        if local.pool is None or local.pid != os.getpid():
            common: dict[str, Any] = {
                "num_pools": 1,
                "maxsize": 1,
                "ssl_context": self._tls_context(),
                "timeout": self.timeout,
                "retries": False,
            }
            if self.proxy:
                proxy_url, proxy_auth = _without_credentials(self.proxy)
                proxy_headers = {"Proxy-Authorization": proxy_auth["authorization"]} if proxy_auth else None
                local.pool = urllib3.ProxyManager(
                    proxy_url,
                    proxy_headers=proxy_headers,
                    proxy_ssl_context=ssl.create_default_context(),
                    **common,
                )
            else:
                local.pool = urllib3.PoolManager(**common)
            local.pid = os.getpid()
            local.host_pool = None
        return local.pool

    def _host_pool(self) -> urllib3.HTTPConnectionPool:
        """This thread's pool for the merchant's host (without a proxy): posting to it straight skips
        the URL parsing and pool lookup the PoolManager does on every request."""
        local = self._local
        manager = self._manager()
        if local.host_pool is None:
            local.host_pool = manager.connection_from_url(self.url)
        return local.host_pool

    def _exchange(self, body: bytes, headers: dict[str, str]) -> Answer:
        try:
            if self.proxy:  # the ProxyManager adds the proxy's headers, or tunnels
                answer = self._manager().urlopen(
                    "POST", self.url, body=body, headers=headers, redirect=False, preload_content=False
                )
            else:  # as PoolManager.urlopen does it: the path alone, any host the URL's
                answer = self._host_pool().urlopen(
                    "POST", self.path, body=body, headers=headers, redirect=False, assert_same_host=False,
                    preload_content=False,
                )  # fmt: skip
        except HTTPError as exc:
            raise _unwrapped(exc) from None
        except HTTPException as exc:  # http.client's own, when urllib3 does not wrap it
            raise AnswerError(f"unreadable answer: {type(exc).__name__}: {exc}") from None
        status, retry_after = answer.status, answer.headers.get("Retry-After")
        if status < 200:  # http.client skips 100 Continue only: the final answer is still unread
            answer.close()
            answer.release_conn()
            raise AnswerError(f"an informational answer (HTTP {status}) before the final one")
        head = len(answer.reason or "") + 15 + sum(len(k) + len(v) + 4 for k, v in answer.headers.items())
        if head > MAX_ANSWER_BYTES:
            answer.close()
            raise AnswerError(f"no status line and headers within {MAX_ANSWER_BYTES} bytes")
        received, start = 0, b""
        content_type = answer.headers.get("Content-Type")
        try:
            while received <= MAX_ANSWER_BYTES:
                data = answer.read(READ_BYTES, decode_content=False)
                if not data:
                    answer.release_conn()
                    connection = answer.headers.get("Connection", "").lower()
                    self._local.reusable = answer.version == 11 and "close" not in connection
                    return Answer(status, retry_after, content_type, self._kept(start))
                if len(start) < 2 * BODY_KEPT_BYTES:  # more than is kept: a credential cut in two is found
                    start += data[: 2 * BODY_KEPT_BYTES - len(start)]
                received += len(data)
        except (HTTPError, HTTPException, OSError):
            pass  # a body cut short: the status is what counts
        # Not worth reading on to keep the connection (or it broke): close it.
        answer.close()
        answer.release_conn()
        return Answer(status, retry_after, content_type, self._kept(start))

    def _kept(self, body_start: bytes) -> bytes:
        """The body's start without our credentials, should the merchant echo them (a URL's or proxy's
        password, the Basic auth header made of the URL's user and password)."""
        for secret in (*self.secrets, *(v.split()[-1] for v in self.auth_headers.values() if v)):
            if secret:
                body_start = body_start.replace(secret.encode(), b"***")
        return body_start[:BODY_KEPT_BYTES]

    def _redacted(self, exc: OSError | AnswerError) -> OSError | AnswerError:
        """`exc` with any password of the URL or the proxy replaced by ***."""
        text = str(exc)
        if not any(secret in text for secret in self.secrets):
            return exc
        for secret in self.secrets:
            text = text.replace(secret, "***")
        return AnswerError(text) if isinstance(exc, AnswerError) else OSError(f"{type(exc).__name__}: {text}")


class _ThreadConnection(threading.local):
    """One thread's pool (of one connection), the process it was made in, and whether the last answer
    was read whole (its connection may be kept alive)."""

    pool: urllib3.PoolManager | None = None
    host_pool: urllib3.HTTPConnectionPool | None = None  # the pool's, for the merchant's host
    pid = 0
    reusable = False


def _unwrapped(exc: HTTPError) -> OSError | AnswerError:
    """The error under urllib3's wrapper: the OSError it met (refused, timed out, reset, TLS), or an
    AnswerError for an answer that could not be read."""
    cause: BaseException | None = exc
    seen = 0
    while cause is not None and seen < 8:
        if isinstance(cause, RemoteDisconnected):
            return cause  # post() sends again on a new connection if this one was kept alive
        if isinstance(cause, HTTPException):
            return AnswerError(f"unreadable answer: {type(cause).__name__}: {cause}")
        if isinstance(cause, OSError):
            if isinstance(exc, ProxyError):
                return OSError(f"proxy: {type(cause).__name__}: {cause}")
            return cause
        inner = [a for a in getattr(cause, "args", ()) if isinstance(a, BaseException)]
        cause = cause.__cause__ or cause.__context__ or (inner[0] if inner else None)
        seen += 1
    if isinstance(exc, Urllib3Timeout):
        return TimeoutError(str(exc))
    if isinstance(exc, ProxyError):
        return OSError(f"proxy: {exc}")
    if isinstance(exc, ProtocolError):
        return AnswerError(f"unreadable answer: {exc}")
    return OSError(f"{type(exc).__name__}: {exc}")

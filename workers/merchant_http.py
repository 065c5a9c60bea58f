"""The HTTP/1.1 client of delivery: one kept-alive connection to the merchant's webhook URL per worker
process, which POSTs one update at a time.

Each request leaves in one send and the answer is parsed by llhttp (httptools, the parser uvicorn
uses), which frames it (Content-Length, chunked, or until close) and reads the status and Retry-After.
`http.client` sends a request's headers and body in two sends and parses the answer's headers with the
`email` package: about 3.5 times the CPU per POST (320 against 90 us, measured in one run against the
bench sink), on a path a worker runs for every update.
"""

from __future__ import annotations

import socket
import ssl
from collections.abc import Mapping
from urllib.parse import urlsplit

import httptools

MAX_ANSWER_BYTES = 65536  # of a merchant's answer read to keep its connection; a longer one closes it
RECEIVE_BYTES = 65536


class AnswerError(Exception):
    """The merchant's answer could not be read: malformed, or cut short before its status line ended."""


class ConnectionDropped(Exception):
    """A kept-alive connection ended before any byte of the answer: the merchant closed it while idle."""


class _Answer:
    """Callbacks of httptools' parser: the final (non-1xx) status, Retry-After, whether it is complete."""

    def __init__(self) -> None:
        self.parser = httptools.HttpResponseParser(self)
        self.status = 0
        self.retry_after: str | None = None
        self.complete = False
        self.keep_alive = False

    def on_header(self, name: bytes, value: bytes) -> None:
        if name.lower() == b"retry-after":
            self.retry_after = value.decode("latin-1")

    def on_headers_complete(self) -> None:
        self.status = self.parser.get_status_code()

    def on_message_complete(self) -> None:
        if self.status >= 200:  # a 1xx (103 Early Hints, a stray 100) comes before the real answer
            self.complete = True
            self.keep_alive = self.parser.should_keep_alive()
        else:
            self.status, self.retry_after = 0, None


class MerchantConnection:
    """POSTs to one URL over a kept-alive connection, opened when needed."""

    def __init__(self, url: str, timeout_seconds: float) -> None:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"not an http(s) URL: {url!r}")
        self.address = (parts.hostname, parts.port or (443 if parts.scheme == "https" else 80))
        self.tls = ssl.create_default_context() if parts.scheme == "https" else None
        self.timeout = timeout_seconds
        target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        host = parts.hostname.encode("idna").decode() + (f":{parts.port}" if parts.port else "")
        try:
            self.request_head = f"POST {target} HTTP/1.1\r\nHost: {host}\r\n".encode("ascii")
        except UnicodeEncodeError:
            raise ValueError(f"percent-encode the path of {url!r}") from None
        self.sock: socket.socket | None = None

    def post(self, body: bytes, headers: Mapping[str, str]) -> tuple[int, str | None]:
        """POST `body`; returns the answer's status and Retry-After. Raises OSError (refused, timed out,
        reset, TLS) or AnswerError, after closing the connection. A kept-alive connection the merchant
        closed while idle fails before any answer: the POST is sent again, once, on a new connection."""
        request = self._request(body, headers)
        reused = self.sock is not None
        try:
            try:
                return self._exchange(request)
            except (ConnectionDropped, ConnectionResetError, BrokenPipeError):
                if not reused:
                    raise
                self.close()
                return self._exchange(request)
        except ConnectionDropped:
            self.close()
            raise AnswerError("connection closed before any answer") from None
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None

    def _request(self, body: bytes, headers: Mapping[str, str]) -> bytes:
        lines = "".join(f"{name}: {value}\r\n" for name, value in headers.items())
        if lines.count("\n") != len(headers) or lines.count("\r") != len(headers):
            raise ValueError("a header holds a line break")
        return b"%s%sContent-Length: %d\r\n\r\n%s" % (self.request_head, lines.encode(), len(body), body)

    def _connect(self) -> socket.socket:
        sock = socket.create_connection(self.address, timeout=self.timeout)
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if self.tls is not None:
                sock = self.tls.wrap_socket(sock, server_hostname=self.address[0])
        except BaseException:
            sock.close()
            raise
        self.sock = sock
        return sock

    def _exchange(self, request: bytes) -> tuple[int, str | None]:
        sock = self.sock or self._connect()
        sock.sendall(request)
        answer = _Answer()
        received = 0
        try:
            while not answer.complete:
                data = sock.recv(RECEIVE_BYTES)
                if not data:
                    if received == 0:
                        raise ConnectionDropped
                    if answer.status:  # an answer framed by the connection's end, or cut short: status read
                        break
                    raise AnswerError("connection closed in the middle of the answer's head")
                received += len(data)
                answer.parser.feed_data(data)
                if received > MAX_ANSWER_BYTES and not answer.complete:
                    if not answer.status:
                        raise AnswerError(f"no status line and headers within {MAX_ANSWER_BYTES} bytes")
                    break  # not worth reading on to keep the connection: closed below
        except httptools.HttpParserError as exc:
            raise AnswerError(f"unreadable answer: {exc}") from None
        if not (answer.complete and answer.keep_alive):
            self.close()
        return answer.status, answer.retry_after

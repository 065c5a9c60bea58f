"""Traces (receiver/tracing.py): a real `serve` and a real worker export their spans over OTLP/HTTP to
a receiver in this test, which decodes them with OpenTelemetry's own protobuf classes."""

from __future__ import annotations

import asyncio
import gzip
import json
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.common.v1.common_pb2 import AnyValue
from opentelemetry.proto.trace.v1.trace_pb2 import Span as SpanMessage

from receiver import tracing
from receiver.app import CALLBACK_PATH
from receiver.errors import ConfigError
from receiver.settings import Settings
from tests.conftest import pem_public
from tests.helpers import JWT, card_order, token
from tests.processes import ROOT, free_port, start_server, start_worker, stop, worker_env
from tests.sink import SECRET, Sink, log_events

CARD_TOKEN = card_order()["payment"]["card"]
GATEWAY_TRACE, GATEWAY_SPAN = "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"


def plain(value: AnyValue) -> Any:
    kind = value.WhichOneof("value")
    if kind == "array_value":
        return [plain(v) for v in value.array_value.values]
    return getattr(value, kind) if kind else None


@dataclass
class ExportedSpan:
    name: str
    kind: int
    trace_id: str
    span_id: str
    parent_id: str
    attributes: dict[str, Any]
    resource: dict[str, Any]
    status: int
    events: list[tuple[str, dict[str, Any]]]


class OtlpReceiver:
    """What an OpenTelemetry collector's OTLP/HTTP receiver does with traces: decode, keep, answer."""

    def __init__(self) -> None:
        self.spans: list[ExportedSpan] = []
        self.content_types: set[str] = set()

    def app(self) -> web.Application:
        async def traces(request: web.Request) -> web.Response:
            body = await request.read()
            if request.headers.get("Content-Encoding") == "gzip":
                body = gzip.decompress(body)
            self.content_types.add(request.content_type)
            export = ExportTraceServiceRequest.FromString(body)
            for resource_spans in export.resource_spans:
                resource = {a.key: plain(a.value) for a in resource_spans.resource.attributes}
                for scope in resource_spans.scope_spans:
                    for span in scope.spans:
                        self.spans.append(
                            ExportedSpan(
                                span.name, span.kind, span.trace_id.hex(), span.span_id.hex(),
                                span.parent_span_id.hex(), {a.key: plain(a.value) for a in span.attributes},
                                resource, span.status.code,
                                [(e.name, {a.key: plain(a.value) for a in e.attributes}) for e in span.events],
                            )
                        )  # fmt: skip
            return web.Response(
                body=ExportTraceServiceResponse().SerializeToString(), content_type="application/x-protobuf"
            )

        app = web.Application()
        app.router.add_post("/v1/traces", traces)
        return app

    def named(self, name: str) -> list[ExportedSpan]:
        return [s for s in self.spans if s.name == name]


async def wait_for(condition: Any, seconds: float = 30) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.05)


async def test_a_callback_and_each_delivery_attempt_are_spans_of_one_trace_and_the_merchant_gets_its_traceparent(
    aiohttp_server: Any, make_sink: Any, redis_url: str, tmp_path: Path, rsa_key: Any, stranger_key: Any
) -> None:
    collector = OtlpReceiver()
    otlp = await aiohttp_server(collector.app())
    sink: Sink = await make_sink()
    sink.answer = lambda _id, n: (500, {}, 0.0) if n == 1 else (200, {}, 0.0)  # one retry, then delivered
    key_file = tmp_path / "key.pem"
    key_file.write_text(pem_public(rsa_key))
    port = free_port()
    env = worker_env(
        redis_url, merchant_webhook_url=sink.url, merchant_webhook_secret=SECRET,
        delivery_retry_schedule="200ms", receiver_host="127.0.0.1", receiver_port=port,
        intergiro_public_keys=f"@{key_file}", otel_exporter_otlp_endpoint=str(otlp.make_url("")).rstrip("/"),
        otel_bsp_schedule_delay="100",
    )  # fmt: skip
    serve_log, worker_log = tmp_path / "serve.log", tmp_path / "worker.log"
    # OpenTelemetry's own variables count in .env too (serve runs where one names its service).
    (tmp_path / ".env").write_text("OTEL_SERVICE_NAME=shop-receiver\n")
    serve = await asyncio.to_thread(
        start_server, "serve", "--processes", "1", port=port, env=env, log=serve_log, cwd=tmp_path
    )
    worker = await asyncio.to_thread(start_worker, env, worker_log)
    try:
        order = card_order("TraceOrder000001")
        async with (
            aiohttp.ClientSession() as http,
            http.post(
                f"http://127.0.0.1:{port}{CALLBACK_PATH}",
                data=token(order, rsa_key),
                # as a gateway in front of the receiver would trace it; baggage stays with us
                headers={
                    **JWT,
                    "X-Request-ID": "req-traced",
                    "traceparent": f"00-{GATEWAY_TRACE}-{GATEWAY_SPAN}-01",
                    "baggage": "tenant=shop-1",
                },
            ) as answer,
        ):
            assert answer.status == 200, await answer.text()
            [update_id] = (await answer.json())["queued"]
            forged = token(card_order("ForgedOrder00001"), stranger_key)
            async with http.post(
                f"http://127.0.0.1:{port}{CALLBACK_PATH}", data=forged, headers=JWT
            ) as refused:
                assert refused.status == 401
        await wait_for(lambda: len(sink.attempts(update_id)) == 2 and len(collector.named("POST")) == 2)
        await wait_for(lambda: len(collector.named("deliver update")) == 2)
    finally:
        await asyncio.gather(asyncio.to_thread(stop, serve), asyncio.to_thread(stop, worker))

    await wait_for(lambda: len(collector.named(f"POST {CALLBACK_PATH}")) == 2)
    callback, rejected = sorted(
        collector.named(f"POST {CALLBACK_PATH}"), key=lambda s: s.attributes["http.response.status_code"]
    )
    assert rejected.attributes["http.response.status_code"] == 401
    [refusal] = [s for s in collector.named("verify callback") if s.parent_id == rejected.span_id]
    assert refusal.status == 2 and [name for name, _ in refusal.events] == ["exception"]  # STATUS_CODE_ERROR
    [verify] = [s for s in collector.named("verify callback") if s.parent_id == callback.span_id]
    [store] = collector.named("store updates")
    assert callback.kind == SpanMessage.SPAN_KIND_SERVER
    assert (callback.trace_id, callback.parent_id) == (
        GATEWAY_TRACE,
        GATEWAY_SPAN,
    )  # the caller's trace, continued
    assert callback.attributes["intergiro.order_id"] == "TraceOrder000001"
    assert callback.attributes["intergiro.request_id"] == "req-traced"
    assert callback.attributes["http.response.status_code"] == 200
    assert callback.resource["service.name"] == "shop-receiver"
    assert callback.resource["intergiro.process"] == "serve"
    assert (verify.parent_id, verify.trace_id) == (callback.span_id, callback.trace_id)
    assert verify.attributes["intergiro.verified_by"].startswith("local:key-")
    assert (store.parent_id, store.trace_id) == (callback.span_id, callback.trace_id)
    assert store.attributes["intergiro.update_ids"] == [update_id]

    attempts = sorted(collector.named("deliver update"), key=lambda s: s.attributes["intergiro.attempt"])
    posts = {s.parent_id: s for s in collector.named("POST")}
    for attempt, (status, outcome), received in zip(
        attempts, [(500, "retry_scheduled"), (200, "delivered")], sink.attempts(update_id), strict=True
    ):
        # The attempt continues the callback's trace, as a child of the step that stored its update.
        assert (attempt.trace_id, attempt.parent_id) == (callback.trace_id, store.span_id)
        assert attempt.kind == SpanMessage.SPAN_KIND_CONSUMER
        assert attempt.resource["intergiro.process"] == "worker"
        assert attempt.resource["service.name"] == "intergiro-receiver"
        assert {k: attempt.attributes[k] for k in (
            "intergiro.update_id", "intergiro.order_id", "intergiro.destination",
            "http.response.status_code", "intergiro.outcome",
        )} == {
            "intergiro.update_id": update_id, "intergiro.order_id": "TraceOrder000001",
            "intergiro.destination": "merchant", "http.response.status_code": status, "intergiro.outcome": outcome,
        }  # fmt: skip
        post = posts[attempt.span_id]
        assert post.kind == SpanMessage.SPAN_KIND_CLIENT
        assert post.attributes["http.response.status_code"] == status
        assert post.attributes["server.address"] == "127.0.0.1"
        # The merchant's traceparent: version, the attempt's trace, the POST's span, flags saying sampled.
        version, trace_id, parent_id, flags = received.headers["traceparent"].split("-")
        assert (version, trace_id, parent_id, int(flags, 16) & 1) == ("00", attempt.trace_id, post.span_id, 1)
        assert "baggage" not in {name.lower() for name in received.headers}
    assert [a.attributes["intergiro.attempt"] for a in attempts] == [1, 2]

    everything = json.dumps([[s.attributes, s.resource, s.events] for s in collector.spans])
    for secret in (CARD_TOKEN, SECRET, sink.url, "/hooks", token(order, rsa_key).decode(), forged.decode()):
        assert secret not in everything
    assert collector.content_types == {"application/x-protobuf"}
    for log, event in ((serve_log, "receiver starting"), (worker_log, "worker starting")):
        [start] = log_events(log, event)
        assert start["tracing"] == f"on: OTLP/HTTP to http://127.0.0.1:{otlp.port}"


async def test_a_collector_that_is_down_costs_no_callback_and_no_delivery_and_the_processes_still_stop(
    make_sink: Any, redis_url: str, tmp_path: Path, rsa_key: Any
) -> None:
    sink: Sink = await make_sink()
    key_file = tmp_path / "key.pem"
    key_file.write_text(pem_public(rsa_key))
    port = free_port()
    env = worker_env(
        redis_url, merchant_webhook_url=sink.url, merchant_webhook_secret=SECRET, receiver_host="127.0.0.1",
        receiver_port=port, intergiro_public_keys=f"@{key_file}",
        otel_exporter_otlp_endpoint=f"http://127.0.0.1:{free_port()}",  # nothing listens there
        otel_bsp_schedule_delay="100",
    )  # fmt: skip
    serve = await asyncio.to_thread(
        start_server, "serve", "--processes", "1", port=port, env=env, log=tmp_path / "serve.log"
    )
    worker = await asyncio.to_thread(start_worker, env, tmp_path / "worker.log")
    try:
        async with aiohttp.ClientSession() as http:
            for n in range(3):
                async with http.post(
                    f"http://127.0.0.1:{port}{CALLBACK_PATH}",
                    data=token(card_order(f"NoCollector00000{n}"), rsa_key),
                    headers=JWT,
                ) as answer:
                    assert answer.status == 200, await answer.text()
        await wait_for(lambda: len(sink.received) == 3)
        assert all("traceparent" in r.headers for r in sink.received)
    finally:
        # SIGTERM, with SIGKILL 5 s later (exit code -9): the exporter retries for 10 s, the stop may not.
        await asyncio.gather(asyncio.to_thread(stop, serve, 5), asyncio.to_thread(stop, worker, 5))
    assert (serve.returncode, worker.returncode) == (0, 0)


def test_without_an_otlp_endpoint_tracing_is_off_and_our_code_imports_nothing_of_opentelemetry() -> None:
    # redis-py imports parts of OpenTelemetry itself when they are installed (its own observability):
    # what counts is what the receiver and the worker add to them.
    program = (
        "import sys, redis, redis.asyncio\n"
        "redis.asyncio.Redis(); redis.Redis()\n"
        "before = set(sys.modules)\n"
        "from receiver import tracing\n"
        "from receiver.app import create_app\n"
        "from receiver.settings import Settings\n"
        "from workers.delivery import deliver_from_job\n"
        "from workers.runner import work\n"
        "settings = Settings.from_env({}, dotenv=False)\n"
        "create_app(settings)\n"
        "print(tracing.status(settings), tracing.start(settings, 'serve').enabled)\n"
        "print(sorted(m for m in set(sys.modules) - before if m.startswith('opentelemetry')))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", program], cwd=ROOT, capture_output=True, text=True, timeout=60, check=True
    )
    assert done.stdout.splitlines() == ["off False", "[]"]


def test_without_the_otel_extra_an_endpoint_leaves_tracing_off_and_says_why() -> None:
    # Python's own way to make a package unimportable: None in sys.modules (as if it were not installed).
    program = (
        "import sys\n"
        "sys.modules['opentelemetry'] = None\n"
        "from receiver import tracing\n"
        "from receiver.app import create_app\n"
        "from receiver.settings import Settings\n"
        "settings = Settings.from_env({'OTEL_EXPORTER_OTLP_ENDPOINT': 'http://collector:4318'}, dotenv=False)\n"
        "print(tracing.status(settings))\n"
        "print(tracing.start(settings, 'serve').enabled)\n"
        "create_app(settings)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", program], cwd=ROOT, capture_output=True, text=True, timeout=60, check=False
    )
    assert (done.returncode, done.stdout.splitlines()) == (0, [tracing.EXTRA_MISSING, "False"]), done.stderr


@pytest.mark.parametrize(
    ("env", "said"),
    [
        ({}, "off"),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "https://user:s3cret@collector.example:4318/otlp"},
         "on: OTLP/HTTP to https://collector.example:4318"),  # no credential in a log line
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318", "OTEL_SDK_DISABLED": "true"},
         "off: OTEL_SDK_DISABLED is true"),
    ],
)  # fmt: skip
def test_the_start_lines_say_whether_tracing_is_on_and_where_without_a_credential(
    env: dict[str, str], said: str
) -> None:
    assert tracing.status(Settings.from_env(env, dotenv=False)) == said


@pytest.mark.parametrize("endpoint", ["collector:4318", "ftp://collector", "http://collector:99999"])
def test_an_otlp_endpoint_that_is_no_http_url_stops_the_process_naming_the_variable(endpoint: str) -> None:
    with pytest.raises(ConfigError, match=r"^OTEL_EXPORTER_OTLP_ENDPOINT: "):
        Settings.from_env({"OTEL_EXPORTER_OTLP_ENDPOINT": endpoint}, dotenv=False)

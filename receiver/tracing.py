"""Traces over OTLP/HTTP: a span per callback (with its verify and store steps) and per delivery
attempt (with its POST), the attempt continuing the trace of the callback that queued its update.

On when OTEL_EXPORTER_OTLP_ENDPOINT is set and the `otel` extra (OpenTelemetry's SDK and OTLP/HTTP
exporter) is installed; otherwise every call here is a no-op and nothing of OpenTelemetry is imported
here.
Everything else about the export (headers, sampler, batch delays, service name, a traces-only
endpoint) is OpenTelemetry's own `OTEL_*` variables, read by its SDK.

How the update carries the callback's trace: the store step's context (its W3C `traceparent`) is
written as the RQ job's `meta` by the intake (`job_meta`), and the worker makes the attempt's span a
child of it (`attempt`), so one trace shows the callback, its store and every attempt of its updates;
the merchant's POST carries the attempt's `traceparent` (`http_post`).

Span attributes are ids, names, counts and statuses only: never a token, a card field, a secret, a
webhook URL (it may hold a credential) or a body.
"""

from __future__ import annotations

import importlib.util
import os
import threading
from collections.abc import Awaitable, Callable, Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import orjson

from receiver import __version__

if TYPE_CHECKING:
    from aiohttp import web

    from receiver.settings import Settings

EXTRA_MISSING = "off: OTEL_EXPORTER_OTLP_ENDPOINT is set but the otel extra is not installed"
SERVICE_NAME = "intergiro-receiver"
# How long a stopping process waits for its last spans to be sent before it gives them up.
SHUTDOWN_SECONDS = 2.0
# How the spans name what they are about (OpenTelemetry's semantic conventions where one fits).
ORDER = "intergiro.order_id"
UPDATE = "intergiro.update_id"
REQUEST = "intergiro.request_id"
DESTINATION = "intergiro.destination"
ATTEMPT = "intergiro.attempt"
OUTCOME = "intergiro.outcome"
HTTP_STATUS = "http.response.status_code"
# A delivery attempt's log fields (workers/delivery.py), as span attributes.
ATTEMPT_ATTRIBUTES = {
    "update": UPDATE,
    "order": ORDER,
    "attempt": ATTEMPT,
    "target": "intergiro.target",
    "http_status": HTTP_STATUS,
    "duration_ms": "intergiro.duration_ms",
    "replay": "intergiro.replay",
}


class _NoSpan:
    """What a span is when tracing is off: takes attributes, keeps nothing."""

    def set_attribute(self, key: str, value: Any) -> None:
        pass

    def set_attributes(self, attributes: Mapping[str, Any]) -> None:
        pass


class _NoSpanContext(AbstractContextManager[_NoSpan]):
    def __enter__(self) -> _NoSpan:
        return NO_SPAN

    def __exit__(self, *_exc: object) -> None:
        return None


NO_SPAN = _NoSpan()
_NOTHING = _NoSpanContext()

Handler = Callable[["web.Request"], Awaitable["web.StreamResponse"]]


class Tracing:
    """Tracing switched off: every step is a no-op costing a method call (the base of OtelTracing)."""

    enabled = False

    def callback(self, handler: Handler, describe: Callable[[web.Request], Mapping[str, Any]]) -> Handler:
        """`handler` (the callback route's) within a server span; `describe` names what it handled."""
        return handler

    def span(self, name: str) -> AbstractContextManager[Any]:
        """A step of the current span (verify, store)."""
        return _NOTHING

    def job_meta(self) -> bytes:
        """The current span's context as an RQ job's `meta` (JSON), b"" when there is none."""
        return b""

    def attempt(
        self, meta: Mapping[str, Any] | None, destination: str, update: Mapping[str, Any]
    ) -> AbstractContextManager[Any]:
        """The span of one delivery attempt, a child of the context in the job's `meta`."""
        return _NOTHING

    def note_attempt(self, outcome: str, logged: Mapping[str, Any]) -> None:
        """The current attempt's outcome and its log fields (update, order, attempt, HTTP status...)."""

    def http_post(self, headers: dict[str, str], host: str, port: int) -> AbstractContextManager[Any]:
        """The span of a POST to the merchant; `headers` gain its `traceparent`."""
        return _NOTHING

    def shutdown(self) -> None:
        """Send the spans still waiting (at a process's stop)."""


NO_TRACING = Tracing()
_current: Tracing = NO_TRACING


def current() -> Tracing:
    """This process's tracing (off until `start`)."""
    return _current


def status(settings: Settings) -> str:
    """What a start line says of tracing: "off", "on: OTLP/HTTP to <endpoint>", or why it is off."""
    if not settings.otel_endpoint:
        return "off"
    if dict(settings.otel_environment).get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return "off: OTEL_SDK_DISABLED is true"
    if not _installed("opentelemetry.sdk.trace", "opentelemetry.exporter.otlp.proto.http.trace_exporter"):
        return EXTRA_MISSING
    endpoint = urlsplit(settings.otel_endpoint)  # without a user and password written in it
    return f"on: OTLP/HTTP to {endpoint.scheme}://{endpoint.hostname}{f':{endpoint.port}' if endpoint.port else ''}"


def _installed(*modules: str) -> bool:
    """Whether the modules can be imported (found, not imported: their packages' parents are)."""
    try:
        return all(importlib.util.find_spec(name) is not None for name in modules)
    except ModuleNotFoundError:  # a parent package is missing
        return False


def start(settings: Settings, process: str) -> Tracing:
    """Start this process's tracing as `status` says (`process`: serve or worker); call once per
    process, after any fork (the exporter's thread and connection are the process's own)."""
    global _current
    if not status(settings).startswith("on"):
        return _current
    # OpenTelemetry's SDK reads its variables from the process environment: those set in `.env` only
    # (read by receiver.settings) are handed to it here; the environment still wins.
    for name, value in settings.otel_environment:
        os.environ.setdefault(name, value)
    _current = OtelTracing(process)
    return _current


class OtelTracing(Tracing):
    """Spans through OpenTelemetry's SDK, exported in batches by its OTLP/HTTP exporter."""

    enabled = True

    def __init__(self, process: str) -> None:
        from opentelemetry import trace
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.resources import OTELResourceDetector, Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
        from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

        defaults = {
            "service.name": SERVICE_NAME,
            "service.version": __version__,
            "intergiro.process": process,
        }
        # OTEL_SERVICE_NAME and OTEL_RESOURCE_ATTRIBUTES win over the defaults.
        resource = Resource.create(defaults).merge(OTELResourceDetector().detect())
        self.provider = TracerProvider(resource=resource)
        self.exporter = OTLPSpanExporter()
        self.provider.add_span_processor(BatchSpanProcessor(self.exporter))
        trace.set_tracer_provider(self.provider)  # a MERCHANT_HANDLER's own spans join the attempt's
        self.tracer = self.provider.get_tracer("intergiro_receiver", __version__)
        self._trace = trace
        # W3C trace context only, whatever OTEL_PROPAGATORS says: the callback URL is open to anyone, and
        # baggage a caller sent would otherwise ride along to the merchant's POST.
        self._propagate = TraceContextTextMapPropagator()

    def callback(self, handler: Handler, describe: Callable[[web.Request], Mapping[str, Any]]) -> Handler:
        trace, tracer, extract = self._trace, self.tracer, self._propagate.extract

        async def traced(request: web.Request) -> web.StreamResponse:
            with tracer.start_as_current_span(
                f"{request.method} {request.path}",
                context=extract(request.headers),
                kind=trace.SpanKind.SERVER,
                attributes={"http.request.method": request.method, "url.path": request.path},
            ) as span:
                response = await handler(request)
                span.set_attributes({k: v for k, v in describe(request).items() if v is not None})
                span.set_attribute(HTTP_STATUS, response.status)
                if response.status >= 500:
                    span.set_status(trace.StatusCode.ERROR)
                return response

        return traced

    def span(self, name: str) -> AbstractContextManager[Any]:
        return self.tracer.start_as_current_span(name)

    def job_meta(self) -> bytes:
        carrier: dict[str, str] = {}
        self._propagate.inject(carrier)
        return orjson.dumps(carrier) if carrier else b""

    def attempt(
        self, meta: Mapping[str, Any] | None, destination: str, update: Mapping[str, Any]
    ) -> AbstractContextManager[Any]:
        carrier = {k: v for k, v in (meta or {}).items() if isinstance(v, str)}
        return self.tracer.start_as_current_span(
            "deliver update",
            context=self._propagate.extract(carrier),
            kind=self._trace.SpanKind.CONSUMER,
            attributes={
                DESTINATION: destination,
                UPDATE: str(update.get("id")),
                ORDER: str(update.get("order_id")),
            },
        )

    def note_attempt(self, outcome: str, logged: Mapping[str, Any]) -> None:
        span = self._trace.get_current_span()
        span.set_attribute(OUTCOME, outcome)
        for field, value in logged.items():
            name = ATTEMPT_ATTRIBUTES.get(field)
            if name is not None and value is not None:
                span.set_attribute(name, value)

    def http_post(self, headers: dict[str, str], host: str, port: int) -> AbstractContextManager[Any]:
        return self._post(headers, host, port)

    @contextmanager
    def _post(self, headers: dict[str, str], host: str, port: int) -> Iterator[Any]:
        with self.tracer.start_as_current_span(
            "POST",
            kind=self._trace.SpanKind.CLIENT,
            attributes={"http.request.method": "POST", "server.address": host, "server.port": port},
        ) as span:
            self._propagate.inject(headers)
            yield span

    def shutdown(self) -> None:
        # The SDK's shutdown waits for an export retrying against a collector that is down (up to its
        # timeout, 10 s by default): after SHUTDOWN_SECONDS the exporter's own shutdown ends the retry.
        closing = threading.Thread(target=self.provider.shutdown, name="tracing-shutdown", daemon=True)
        closing.start()
        closing.join(SHUTDOWN_SECONDS)
        if closing.is_alive():
            self.exporter.shutdown()  # type: ignore[no-untyped-call]
            closing.join(SHUTDOWN_SECONDS)
